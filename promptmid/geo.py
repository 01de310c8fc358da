"""Georeferencing maths: CRS, geotransforms, geo priors, search radii (the scene products are written by
:mod:`promptmid.scene.products`).

Conventions used throughout:

* **pixel coordinates** ``(x, y)`` = (column, row), pixel centres at integers, origin at the
  centre of the top-left pixel (as everywhere in promptmid);
* **map coordinates** ``(X, Y)`` are in the optical image's CRS (e.g. metres in UTM). A rasterio
  geotransform ``A`` maps pixel *corners*, so pixel centre ``(x, y)`` has map coordinates
  ``A * (x + 0.5, y + 0.5)`` (see :func:`pixel_to_map_matrix`);
* every 3x3 transform named ``prior`` or ``transform`` maps **optical pixels to SAR pixels**.

When the SAR image is in another CRS than the optical image, it is read through a
``rasterio.vrt.WarpedVRT`` in the optical CRS (lazy, windowed reprojection); "SAR pixels" then
means pixels of that reprojected grid (its geotransform is reported as ``sar_grid``), and
:func:`sar_grid_to_file_pixels` maps them back to pixels of the SAR file.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from promptmid.geometry import Size
from promptmid.errors import InputError
from promptmid.geometry import apply_transform

if TYPE_CHECKING:
    from promptmid.io import PreparedImage


MAX_SIDE = 1_000_000  # largest grid side (px) a result record may name


@dataclass
class Grid:
    """A raster's pixel grid, without pixels: size, bands, georeferencing, nodata.

    The one grid record of promptmid: what scenes read from their files (:func:`geo_info`), what ``result.json``
    stores (``grids`` of a match, ``optical``/``sar`` of a scene) and what the writers of registered rasters take.

    Attributes:
        width, height: size in pixels.
        count: number of bands; dtype: numpy dtype name of the bands.
        crs: a ``rasterio.crs.CRS`` or ``None``; transform: rasterio ``Affine`` (pixel corners -> map) or ``None``.
        nodata: the nodata value or ``None``.
    """

    width: int
    height: int
    count: int = 1
    dtype: str = "uint8"
    crs: Any = None
    transform: Any = None
    nodata: float | None = None

    @classmethod
    def of(cls, raster: Any) -> "Grid":
        """The grid of a :class:`promptmid.io.RasterImage` (its ORIGINAL size, also when it was read decimated)."""
        from rasterio.crs import CRS

        w, h = raster.original_size
        return cls(int(w), int(h), int(raster.data.shape[-1]), str(raster.data.dtype),
                   CRS.from_user_input(raster.crs) if raster.crs else None, raster.transform, raster.nodata)

    @classmethod
    def from_dict(cls, d: Any, where: str = "grid") -> "Grid":
        """Read a :meth:`to_dict` record; ``where`` (e.g. ``"result.json: 'grids.optical'"``) names it in errors.

        Raises:
            InputError: not a record, a side that is not a whole number in 1..:data:`MAX_SIDE`, a CRS that does not
                parse, a geotransform that is not six finite numbers, a nodata value that is not a number.
        """
        from rasterio.crs import CRS
        from rasterio.errors import CRSError
        from rasterio.transform import Affine

        if not isinstance(d, dict):
            raise InputError(f"{where} is not a grid record.")
        sides = [d.get(k) for k in ("width", "height")]
        if not all(_whole(v) and 1 <= v <= MAX_SIDE for v in sides):
            raise InputError(f"{where}: width and height must be whole numbers of pixels in 1..{MAX_SIDE}; "
                             f"got {sides}.")
        try:
            crs = CRS.from_user_input(d["crs"]) if d.get("crs") else None
        except (CRSError, TypeError, ValueError):
            raise InputError(f"{where}: 'crs' is not a coordinate reference system.") from None
        geo = d.get("transform")
        if geo is not None and not (isinstance(geo, list) and len(geo) >= 6 and finite_numbers(geo[:6])):
            raise InputError(f"{where}: 'transform' must be six finite numbers (a geotransform).")
        nodata = d.get("nodata")
        if nodata is not None and not isinstance(nodata, float) and not finite_numbers([nodata]):
            raise InputError(f"{where}: 'nodata' must be a number.")
        count, dtype = d.get("count", 1), d.get("dtype", "uint8")
        if not (_whole(count) and count >= 1 and isinstance(dtype, str) and _is_dtype(dtype)):
            raise InputError(f"{where}: 'count' must be a whole number >= 1 and 'dtype' a raster data type.")
        return cls(sides[0], sides[1], count, dtype, crs, Affine(*geo[:6]) if geo is not None else None, nodata)

    @property
    def size(self) -> Size:
        return Size(self.width, self.height)

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None and not self.transform.is_identity

    @property
    def pixel_size(self) -> float | None:
        """Mean pixel size in map units (sqrt of the pixel area; DEGREES for a geographic CRS), ``None`` when not
        georeferenced. For ground distances use :attr:`metres_per_pixel`."""
        return math.sqrt(abs(self.transform.determinant)) if self.georeferenced else None

    @property
    def metres_per_pixel(self) -> tuple[float, float] | None:
        """Ground metres per pixel step along x and along y at the raster's centre (see
        :func:`metres_per_pixel`), ``None`` when not georeferenced."""
        return metres_per_pixel(self.crs, self.transform, self.width, self.height) if self.georeferenced else None

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "count": self.count, "dtype": self.dtype,
                "crs": self.crs.to_string() if self.crs else None,
                "transform": list(self.transform)[:6] if self.georeferenced else None, "nodata": self.nodata}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite_numbers(values: Any) -> bool:
    """Whether every item is a finite int or float (not a bool, not text)."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _is_dtype(name: str) -> bool:
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


def open_raster(path: str | Path) -> Any:
    """Open a raster for windowed reading (a rasterio dataset; close it after use).

    Raises:
        InputError: missing or unreadable file.
    """
    import rasterio
    from rasterio.errors import RasterioIOError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"No image file at path {path}.")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"Cannot read {path} as a raster ({exc}).") from None


def geo_info(ds: Any) -> Grid:
    """:class:`Grid` of an open rasterio dataset (or WarpedVRT)."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        crs, transform = ds.crs, ds.transform
    return Grid(ds.width, ds.height, ds.count, ds.dtypes[0], crs if crs else None,
                   transform if crs else None, ds.nodata)


def sar_in_optical_crs(sar_ds: Any, optical: Grid) -> tuple[Any, bool]:
    """Return the SAR dataset to read from: itself, or a WarpedVRT in the optical CRS.

    Returns:
        ``(dataset, reprojected)``; ``reprojected`` is True when a WarpedVRT was made.
    Raises:
        InputError: the SAR CRS cannot be transformed into the optical CRS.
    """
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    sar = geo_info(sar_ds)
    if not (optical.georeferenced and sar.georeferenced) or sar.crs == optical.crs:
        return sar_ds, False
    try:
        vrt = WarpedVRT(sar_ds, crs=optical.crs, resampling=Resampling.bilinear,
                        src_nodata=sar.nodata, nodata=sar.nodata if sar.nodata is not None else 0)
    except Exception as exc:  # noqa: BLE001 - GDAL raises several types for impossible reprojections
        raise InputError(f"Cannot reproject the SAR image from {sar.crs} to the optical CRS "
                         f"{optical.crs} ({exc}).") from None
    return vrt, True


def optical_on_utm(opt_ds: Any) -> tuple[Any, bool]:
    """The optical dataset to work on for ``--grid utm``: a WarpedVRT on the local WGS84 / UTM zone grid
    (:func:`utm_crs_at` the image centre; square pixels, GDAL's suggested size), or ``opt_ds`` itself when it is
    already on that zone. Pixels outside the original footprint are nodata (the file's nodata value, else 0).

    Returns:
        ``(dataset, reprojected)``.
    Raises:
        InputError: the optical image is not georeferenced or cannot be reprojected.
    """
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    info = geo_info(opt_ds)
    if not info.georeferenced:
        raise InputError("--grid utm needs a georeferenced optical image (it has no CRS or geotransform).")
    centre = pixel_to_map(info.transform, np.array([[(info.width - 1) / 2, (info.height - 1) / 2]]))[0]
    if info.crs.is_geographic:
        lon, lat = centre
    else:
        from rasterio.warp import transform as crs_transform

        (lon,), (lat,) = crs_transform(info.crs, "EPSG:4326", [centre[0]], [centre[1]])
    utm = utm_crs_at(float(lon), float(lat))
    if info.crs == utm:
        return opt_ds, False
    nodata = info.nodata if info.nodata is not None else 0
    try:
        return WarpedVRT(opt_ds, crs=utm, resampling=Resampling.bilinear, src_nodata=info.nodata, nodata=nodata), True
    except Exception as exc:  # noqa: BLE001 - GDAL raises several types for impossible reprojections
        raise InputError(f"Cannot reproject the optical image from {info.crs} to {utm} ({exc}).") from None


def pixel_to_map_matrix(transform: Any) -> np.ndarray:
    """3x3 matrix mapping pixel centres ``(x, y)`` to map ``(X, Y)`` for a rasterio ``Affine``."""
    a = np.array([[transform.a, transform.b, transform.c], [transform.d, transform.e, transform.f], [0, 0, 1.0]])
    return a @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])


def pixel_to_map(transform: Any, points: np.ndarray) -> np.ndarray:
    """``[N, 2]`` pixel (x, y) -> ``[N, 2]`` map (X, Y) under ``transform``."""
    return apply_transform(pixel_to_map_matrix(transform), points)


def geo_prior(optical: Grid, sar: Grid) -> np.ndarray:
    """Optical px -> SAR px transform implied by the two geotransforms (same CRS required)."""
    if not (optical.georeferenced and sar.georeferenced):
        raise InputError("A geo prior needs both images georeferenced (CRS and geotransform).")
    if optical.crs != sar.crs:
        raise InputError(f"Geo prior needs one CRS; got {optical.crs} and {sar.crs} (reproject first).")
    return np.linalg.inv(pixel_to_map_matrix(sar.transform)) @ pixel_to_map_matrix(optical.transform)


def map_transform(transform: np.ndarray, optical: Grid, sar: Grid) -> np.ndarray | None:
    """An optical px -> SAR px transform expressed as optical map -> SAR map (its georeferencing).

    ``X_sar = M X_opt``: where the content at optical map position ``X_opt`` lies according to the
    SAR image's own georeferencing. Identity means the SAR georeferencing is already right.
    """
    if not (optical.georeferenced and sar.georeferenced):
        return None
    return pixel_to_map_matrix(sar.transform) @ transform @ np.linalg.inv(pixel_to_map_matrix(optical.transform))


def utm_crs_at(lon: float, lat: float) -> Any:
    """The WGS84 / UTM zone CRS (a ``rasterio.crs.CRS``) containing ``(lon, lat)`` degrees."""
    from rasterio.crs import CRS

    zone = min(60, max(1, int((lon + 180.0) // 6.0) + 1))
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def metres_per_pixel(crs: Any, transform: Any, width: int, height: int) -> tuple[float, float]:
    """Ground metres per pixel step ``(along x, along y)`` at the centre of a ``width x height`` grid.

    Projected CRS: the pixel step lengths times the CRS's linear unit in metres (1 for metres, 0.3048 for
    feet). Geographic CRS (degrees): the centre pixel and its right / lower neighbours are transformed to the
    local UTM zone (:func:`utm_crs_at`) and measured there, so a degree of longitude shrinks with latitude.
    """
    if not crs.is_geographic:
        try:
            unit = float(crs.linear_units_factor[1])
        except Exception:  # noqa: BLE001 - CRS without a known linear unit: assume metres
            unit = 1.0
        return math.hypot(transform.a, transform.d) * unit, math.hypot(transform.b, transform.e) * unit
    from rasterio.warp import transform as crs_transform

    c = np.array([[(width - 1) / 2, (height - 1) / 2]])
    pts = pixel_to_map(transform, np.concatenate([c, c + [1, 0], c + [0, 1]]))
    xs, ys = crs_transform(crs, utm_crs_at(float(pts[0, 0]), float(pts[0, 1])), pts[:, 0], pts[:, 1])
    xy = np.stack([xs, ys], 1)
    return float(np.linalg.norm(xy[1] - xy[0])), float(np.linalg.norm(xy[2] - xy[0]))


def residuals_m(vectors_px: np.ndarray, mpp: tuple[float, float] | None) -> np.ndarray | None:
    """``[N, 2]`` residual vectors in pixels -> ``[N]`` ground lengths in metres (``None`` without ``mpp``)."""
    if mpp is None or len(vectors_px) == 0:
        return None
    return np.linalg.norm(np.asarray(vectors_px, np.float64) * np.asarray(mpp, np.float64), axis=1)


AUTO_RADIUS_PX, AUTO_RADIUS_M = 64.0, 150.0  # --search-radius auto: the larger of these (metres when georeferenced)


def parse_search_radius(text: str | float, pixel_size: float | None) -> float:
    """Search radius in optical pixels from ``"64px"``, ``"500m"``, a bare number or ``"auto"`` (the larger of
    64 px and 150 m: 150 px on a 1 m product, whose geolocation may be tens of metres off; 64 px = 640 m at 10 m).

    A bare number means metres when ``pixel_size`` (ground metres per optical pixel; pass the smaller of
    :attr:`Grid.metres_per_pixel` so that the radius is covered along both axes) is known, else pixels.

    Raises:
        InputError: unparsable text, or metres without a georeferenced optical image.
    """
    if str(text).strip() == "auto":
        return max(AUTO_RADIUS_PX, AUTO_RADIUS_M / pixel_size) if pixel_size else AUTO_RADIUS_PX
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(px|m)?\s*", str(text))
    if not m:
        raise InputError(f"Cannot parse search radius {text!r}; use e.g. '64px' or '500m'.")
    value, unit = float(m.group(1)), m.group(2) or ("m" if pixel_size else "px")
    if unit == "px":
        return value
    if not pixel_size:
        raise InputError(f"Search radius {text!r} is in metres but the optical image is not georeferenced.")
    return value / pixel_size


def overlap_bbox(prior: np.ndarray, optical_size: Size, sar_size: Size,
                 samples: int = 21) -> tuple[int, int, int, int] | None:
    """Optical pixel box ``(x0, y0, x1, y1)`` (end-exclusive) covering the SAR footprint.

    The SAR border is sampled, mapped to the optical grid by ``inv(prior)`` and clipped to the
    optical image. ``None`` when the footprints do not overlap.
    """
    w, h = sar_size
    t = np.linspace(0, 1, samples)
    border = np.concatenate([np.stack([t * (w - 1), np.zeros_like(t)], 1), np.stack([t * (w - 1), np.full_like(t, h - 1)], 1),
                             np.stack([np.zeros_like(t), t * (h - 1)], 1), np.stack([np.full_like(t, w - 1), t * (h - 1)], 1)])
    pts = apply_transform(np.linalg.inv(prior), border)
    x0, y0 = np.floor(pts.min(0)).astype(int)
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, optical_size[0]), min(y1, optical_size[1])
    return None if x1 - x0 < 2 or y1 - y0 < 2 else (int(x0), int(y0), int(x1), int(y1))


def sar_grid_to_file_pixels(points: np.ndarray, grid: Grid, sar_file: Grid) -> np.ndarray:
    """Map ``[N, 2]`` pixels of the (possibly reprojected) SAR grid to pixels of the SAR file."""
    if not (grid.georeferenced and sar_file.georeferenced) or grid.crs == sar_file.crs:
        return np.asarray(points, np.float64)
    from rasterio.warp import transform as crs_transform

    xy = pixel_to_map(grid.transform, points)
    xs, ys = crs_transform(grid.crs, sar_file.crs, xy[:, 0], xy[:, 1])
    return apply_transform(np.linalg.inv(pixel_to_map_matrix(sar_file.transform)), np.stack([xs, ys], 1))


def rmse(values: np.ndarray) -> float | None:
    """Root mean square of ``values`` (``None`` when empty)."""
    v = np.asarray(values, np.float64)
    return float(np.sqrt(np.mean(v**2))) if len(v) else None


def pixel_size_ratio(optical: PreparedImage, sar: PreparedImage) -> float | None:
    """Optical pixel size over SAR pixel size (SAR px per optical px) when both images are georeferenced in the
    same CRS; ``None`` otherwise."""
    try:
        r0, r1 = optical.raster, sar.raster
        if r0 is None or r1 is None or not r0.crs or not r1.crs or r0.crs != r1.crs:
            return None
        px0 = math.sqrt(abs(r0.transform.a * r0.transform.e))
        px1 = math.sqrt(abs(r1.transform.a * r1.transform.e))
    except AttributeError:
        return None
    return px0 / px1 if px0 > 0 and px1 > 0 else None
