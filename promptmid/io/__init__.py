"""Images in and out: reading rasters (PNG/JPEG/TIFF/GeoTIFF), band choice, radiometric scaling of optical and SAR
data, and preparation for the models.

Every image goes through :func:`load_image`, which returns a :class:`PreparedImage`: a 3-channel float32 array in
``[0, 1]`` at working resolution, a validity mask, and the scale back to the original pixel grid. Pixel convention:
(x, y) = (column, row), pixel centres at integer coordinates, origin at the centre of the top-left pixel.

Modules, by job: :mod:`~promptmid.io.raster` (files and input checks), :mod:`~promptmid.io.bands` (which bands the
models see), :mod:`~promptmid.io.radiometry` (SAR scaling, stretch, fill masks), :mod:`~promptmid.io.prepare`
(:func:`load_image`, working-grid transforms, rotated copies). Everything public is importable from here.
"""

from promptmid.io.bands import BandChoice, choose_bands, parse_bands
from promptmid.io.prepare import (
    PreparedImage,
    downscale_prepared,
    image_tensor,
    load_image,
    rotate_prepared,
    rotation_steps,
    to_original,
)
from promptmid.io.radiometry import (
    HOLE_PX,
    SAR_SCALES,
    border_fill_mask,
    fill_holes,
    fill_nodata,
    optical_to_unit,
    sar_scale_of,
    sar_to_unit,
    stretch,
)
from promptmid.io.raster import (
    MIN_SIDE,
    Modality,
    RasterImage,
    as_raster,
    check_image_path,
    check_raster,
    expand_palette,
    open_for_write,
    read_raster,
    to_uint8,
    write_png,
)

__all__ = [
    "BandChoice", "HOLE_PX", "MIN_SIDE", "Modality", "PreparedImage", "RasterImage", "SAR_SCALES", "as_raster",
    "border_fill_mask", "check_image_path", "check_raster", "choose_bands", "downscale_prepared", "expand_palette",
    "fill_holes", "fill_nodata", "image_tensor", "load_image", "open_for_write", "optical_to_unit", "original_transform",
    "parse_bands", "read_raster", "rotate_prepared", "rotation_steps", "sar_scale_of", "sar_to_unit", "stretch",
    "to_original", "to_uint8", "write_png",
]
