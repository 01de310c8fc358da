"""Reading and writing raster files: :class:`RasterImage` (raw pixels as in the file), input checks.

Pixel convention (all of :mod:`promptmid.io`): (x, y) = (column, row), pixel centres at integer coordinates, origin
at the centre of the top-left pixel.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import cv2
import numpy as np

from promptmid.errors import InputError
from promptmid.geometry import Size

Modality = Literal["optical", "sar"]

MIN_SIDE = 32  # smallest side (px) the models can use


@dataclass
class RasterImage:
    """Raw pixels as read from disk.

    Attributes:
        data: ``[H, W, C]`` array in the file's dtype (all C bands of the file).
        path: where it came from (``None`` for in-memory arrays).
        nodata: the file's nodata value, if any.
        crs: CRS as WKT, or ``None`` when not georeferenced.
        transform: affine geotransform (rasterio ``Affine``) of the file's full grid, or ``None``.
        full_size: the file's size when ``data`` was read decimated (a large image read only up to the
            working size), else ``None``; see :attr:`original_size`.
        descriptions: per-band descriptions (e.g. ``("B02", "B03", "B04", "B08")`` or ``("VV", "VH")``; ``None``
            where a band has none); empty when unknown (arrays).
        colorinterp: per-band colour interpretation names (``"red"``, ``"gray"``, ``"alpha"``, ...); empty when
            unknown. Both drive :func:`choose_bands`.
    """

    data: np.ndarray
    path: Path | None = None
    nodata: float | None = None
    crs: str | None = None
    transform: Any = None
    full_size: Size | None = None
    descriptions: tuple[str | None, ...] = ()
    colorinterp: tuple[str, ...] = ()

    @property
    def original_size(self) -> Size:
        """``(width, height)`` of the image in the file (the size every result refers to)."""
        return self.full_size or self.size

    def full(self) -> "RasterImage":
        """The raster at full resolution (read again from its file when ``data`` is decimated)."""
        return self if self.full_size is None or self.path is None else read_raster(self.path)

    def pick(self, bands: Sequence[int]) -> "RasterImage":
        """The same raster with only ``bands`` (1-based, in that order)."""
        idx = [b - 1 for b in bands]
        keep = lambda items: tuple(items[i] for i in idx) if len(items) == self.data.shape[-1] else ()  # noqa: E731
        return dataclasses.replace(self, data=self.data[..., idx], descriptions=keep(self.descriptions),
                                   colorinterp=keep(self.colorinterp))

    @property
    def label(self) -> str:
        """How messages name this image: its path, or ``"input array"``."""
        return str(self.path) if self.path else "input array"

    @property
    def size(self) -> Size:
        """``(width, height)`` in pixels."""
        return Size.of(self.data)


DECIMATE_ABOVE = 2  # read decimated when the long side exceeds this many times the working size


def check_image_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` if it names a non-empty file (cheap: nothing is read).

    Raises:
        InputError: no such file, a directory, or an empty file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"No image at path {path}.")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an image.")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is an empty file.")
    return path


def read_raster(path: str | Path, max_side: int | None = None) -> RasterImage:
    """Read an image file into a :class:`RasterImage` (all bands, native dtype).

    With ``max_side``, an image whose long side exceeds ``DECIMATE_ABOVE * max_side`` is read decimated
    (nearest neighbour, whole-pixel steps) to about that size, so memory stays bounded whatever the file
    size; ``full_size`` then records the file's size and :meth:`RasterImage.full` reads it all when a product
    needs full resolution.

    Raises:
        InputError: missing, unreadable or empty file, or an unsupported band count.
    """
    path = check_image_path(path)
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                step = _decimation(src.width, src.height, max_side)
                out_shape = (src.count, -(-src.height // step), -(-src.width // step))
                data = src.read() if step == 1 else src.read(out_shape=out_shape)
                full_size = Size(src.width, src.height) if step > 1 else None
                crs = src.crs.to_wkt() if src.crs else None
                transform = src.transform if src.crs else None
                nodata = src.nodata
                driver = src.driver
                meta = {"descriptions": tuple(src.descriptions), "colorinterp": tuple(c.name for c in src.colorinterp)}
                if meta["colorinterp"] == ("palette",):
                    data, meta = expand_palette(data[0], src.colormap(1))
    except (RasterioIOError, ValueError) as exc:
        raise InputError(f"Cannot read {path} as an image ({exc}).") from None
    if driver in ("PNG", "JPEG"):
        _check_complete(path)
    return RasterImage(np.moveaxis(data, 0, -1), path, nodata, crs, transform, full_size, **meta)


def expand_palette(indices: np.ndarray, colormap: dict[int, tuple[int, ...]]) -> tuple[np.ndarray, dict[str, Any]]:
    """A palette image (``[H, W]`` colour-table indices) as its colours: ``([3 or 4, H, W] uint8, meta)``.

    The indices of a palette image are labels, not brightness (a shuffled palette shows the same picture with other
    numbers): the models must see the colours. An alpha band is kept when the table has transparent entries.
    """
    size = max(256, int(indices.max()) + 1)
    lut = np.zeros((size, 4), np.uint8)
    lut[:, 3] = 255
    for index, colour in colormap.items():
        if 0 <= index < size:
            lut[index, :len(colour)] = colour[:4]
    bands = 4 if (lut[np.unique(indices), 3] < 255).any() else 3
    data = np.moveaxis(lut[indices][..., :bands], -1, 0)
    names = ("red", "green", "blue", "alpha")[:bands]
    return np.ascontiguousarray(data), {"descriptions": (None,) * bands, "colorinterp": names}


def _decimation(width: int, height: int, max_side: int | None) -> int:
    """Whole-pixel read step for a file of ``width x height`` px (1 = read everything)."""
    if not max_side or max(width, height) <= DECIMATE_ABOVE * max_side:
        return 1
    return -(-max(width, height) // (DECIMATE_ABOVE * max_side))  # ceil: the read stays <= that size


def _check_complete(path: Path) -> None:
    """GDAL fills a truncated PNG/JPEG with zeros silently; a full decode with Pillow notices it.

    Raises:
        InputError: the file is truncated or corrupt.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path} is truncated or corrupt ({exc}).") from None


def as_raster(source: str | Path | np.ndarray | RasterImage, max_side: int | None = None) -> RasterImage:
    """Accept a path (read decimated up to ``max_side``, see :func:`read_raster`), an ``[H, W]`` /
    ``[H, W, C]`` array, or a :class:`RasterImage`."""
    if isinstance(source, RasterImage):
        return source
    if isinstance(source, np.ndarray):
        data = source[..., None] if source.ndim == 2 else source
        if data.ndim != 3:
            raise InputError(f"Expected an [H, W] or [H, W, C] array, got shape {source.shape}.")
        return RasterImage(data)
    return read_raster(source, max_side)




def check_raster(raster: RasterImage, nan_as_nodata: bool = False, mask: np.ndarray | None = None) -> np.ndarray:
    """Validate a raster (the bands the models will see) and return its ``[H, W]`` validity mask (before fill
    detection): False where a band is NaN/inf (allowed only with ``nan_as_nodata`` or a NaN nodata value), where
    every band equals the nodata value, and where ``mask`` (e.g. an alpha band) is False.

    Raises:
        InputError: empty, too small, NaNs (unless allowed), no valid pixel, or a constant image.
    """
    data, name = raster.data, raster.label
    h, w, c = data.shape
    if h == 0 or w == 0 or c == 0:
        raise InputError(f"{name} is empty (size {w}x{h}, {c} bands).")
    if min(h, w) < MIN_SIDE:
        raise InputError(f"{name} is {w}x{h} px; the models need at least {MIN_SIDE} px a side.")
    finite = np.isfinite(data).all(axis=-1) if data.dtype.kind == "f" else np.ones((h, w), bool)
    nan_nodata = raster.nodata is not None and np.isnan(raster.nodata)
    if not finite.all() and not (nan_as_nodata or nan_nodata):
        raise InputError(
            f"{name} contains {int((~finite).sum())} NaN/inf pixels; pass --nan-as-nodata to treat them as nodata."
        )
    valid = finite if mask is None else finite & mask
    if raster.nodata is not None and not nan_nodata:
        valid &= ~(data == raster.nodata).all(axis=-1)
    if not valid.any():
        raise InputError(f"{name} has no valid pixel (all nodata, NaN/inf or masked).")
    vals = data[valid]
    if float(np.ptp(vals)) == 0.0:
        raise InputError(f"{name} is constant (every valid pixel is {vals.flat[0]}); nothing to match.")
    return valid




def open_for_write(path: Path, profile: dict[str, Any]) -> Any:
    """Open a raster for writing; a plain (non-georeferenced) TIFF raises no warning."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, "w", **profile)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``[0, 1]`` float image to uint8."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB ``[H, W, 3]`` (or gray) uint8/float image as PNG."""
    img = to_uint8(image) if image.dtype != np.uint8 else image
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise InputError(f"Cannot write {path}.")
