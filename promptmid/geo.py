"""Georeferencing: CRS, geotransforms, geo priors, map-coordinate products.

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

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from promptmid.errors import InputError
from promptmid.geometry import apply_transform


@dataclass
class GeoInfo:
    """Size and georeferencing of a raster (no pixels).

    Attributes:
        width, height: size in pixels.
        count: number of bands; dtype: numpy dtype name of the bands.
        crs: a ``rasterio.crs.CRS`` or ``None``; transform: rasterio ``Affine`` (pixel corners -> map).
        nodata: the nodata value or ``None``.
    """

    width: int
    height: int
    count: int
    dtype: str
    crs: Any = None
    transform: Any = None
    nodata: float | None = None

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None and not self.transform.is_identity

    @property
    def pixel_size(self) -> float | None:
        """Mean pixel size in map units (sqrt of the pixel area), ``None`` when not georeferenced."""
        return math.sqrt(abs(self.transform.determinant)) if self.georeferenced else None

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "count": self.count, "dtype": self.dtype,
                "crs": self.crs.to_string() if self.crs else None,
                "transform": list(self.transform)[:6] if self.georeferenced else None, "nodata": self.nodata}


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


def geo_info(ds: Any) -> GeoInfo:
    """:class:`GeoInfo` of an open rasterio dataset (or WarpedVRT)."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        crs, transform = ds.crs, ds.transform
    return GeoInfo(ds.width, ds.height, ds.count, ds.dtypes[0], crs if crs else None,
                   transform if crs else None, ds.nodata)


def sar_in_optical_crs(sar_ds: Any, optical: GeoInfo) -> tuple[Any, bool]:
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


def pixel_to_map_matrix(transform: Any) -> np.ndarray:
    """3x3 matrix mapping pixel centres ``(x, y)`` to map ``(X, Y)`` for a rasterio ``Affine``."""
    a = np.array([[transform.a, transform.b, transform.c], [transform.d, transform.e, transform.f], [0, 0, 1.0]])
    return a @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1.0]])


def pixel_to_map(transform: Any, points: np.ndarray) -> np.ndarray:
    """``[N, 2]`` pixel (x, y) -> ``[N, 2]`` map (X, Y) under ``transform``."""
    return apply_transform(pixel_to_map_matrix(transform), points)


def geo_prior(optical: GeoInfo, sar: GeoInfo) -> np.ndarray:
    """Optical px -> SAR px transform implied by the two geotransforms (same CRS required)."""
    if not (optical.georeferenced and sar.georeferenced):
        raise InputError("A geo prior needs both images georeferenced (CRS and geotransform).")
    if optical.crs != sar.crs:
        raise InputError(f"Geo prior needs one CRS; got {optical.crs} and {sar.crs} (reproject first).")
    return np.linalg.inv(pixel_to_map_matrix(sar.transform)) @ pixel_to_map_matrix(optical.transform)


def map_transform(transform: np.ndarray, optical: GeoInfo, sar: GeoInfo) -> np.ndarray | None:
    """An optical px -> SAR px transform expressed as optical map -> SAR map (its georeferencing).

    ``X_sar = M X_opt``: where the content at optical map position ``X_opt`` lies according to the
    SAR image's own georeferencing. Identity means the SAR georeferencing is already right.
    """
    if not (optical.georeferenced and sar.georeferenced):
        return None
    return pixel_to_map_matrix(sar.transform) @ transform @ np.linalg.inv(pixel_to_map_matrix(optical.transform))


def parse_search_radius(text: str | float, pixel_size: float | None) -> float:
    """Search radius in optical pixels from ``"64px"``, ``"500m"`` or a bare number.

    A bare number means metres when ``pixel_size`` (map units per optical pixel, assumed metres)
    is known, else pixels.

    Raises:
        InputError: unparsable text, or metres without a georeferenced optical image.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(px|m)?\s*", str(text))
    if not m:
        raise InputError(f"Cannot parse search radius {text!r}; use e.g. '64px' or '500m'.")
    value, unit = float(m.group(1)), m.group(2) or ("m" if pixel_size else "px")
    if unit == "px":
        return value
    if not pixel_size:
        raise InputError(f"Search radius {text!r} is in metres but the optical image is not georeferenced.")
    return value / pixel_size


def overlap_bbox(prior: np.ndarray, optical_size: tuple[int, int], sar_size: tuple[int, int],
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


def sar_grid_to_file_pixels(points: np.ndarray, grid: GeoInfo, sar_file: GeoInfo) -> np.ndarray:
    """Map ``[N, 2]`` pixels of the (possibly reprojected) SAR grid to pixels of the SAR file."""
    if not (grid.georeferenced and sar_file.georeferenced) or grid.crs == sar_file.crs:
        return np.asarray(points, np.float64)
    from rasterio.warp import transform as crs_transform

    xy = pixel_to_map(grid.transform, points)
    xs, ys = crs_transform(grid.crs, sar_file.crs, xy[:, 0], xy[:, 1])
    return apply_transform(np.linalg.inv(pixel_to_map_matrix(sar_file.transform)), np.stack([xs, ys], 1))


@dataclass
class TiePoints:
    """Merged tie points of a scene.

    Attributes:
        optical_px: ``[N, 2]`` optical pixels; sar_px: ``[N, 2]`` SAR-grid pixels.
        sar_file_px: ``[N, 2]`` pixels of the SAR file (differs from ``sar_px`` after reprojection).
        tile: ``[N]`` tile index; similarity: ``[N]``; inlier: ``[N]`` bool (global fit).
        residual_px: ``[N]`` global-fit residual in SAR-grid pixels; prior_residual_px: the same under the prior.
    """

    optical_px: np.ndarray
    sar_px: np.ndarray
    sar_file_px: np.ndarray
    tile: np.ndarray
    similarity: np.ndarray
    inlier: np.ndarray
    residual_px: np.ndarray
    prior_residual_px: np.ndarray


def write_tiepoints_csv(path: Path, tp: TiePoints, optical: GeoInfo, sar_grid: GeoInfo) -> None:
    """CSV: tile, optical px, optical map, SAR px (grid and file), SAR map (its own georef), residuals."""
    import csv

    opt_map = pixel_to_map(optical.transform, tp.optical_px) if optical.georeferenced else None
    sar_map = pixel_to_map(sar_grid.transform, tp.sar_px) if sar_grid.georeferenced else None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tile", "optical_x", "optical_y", "map_x", "map_y", "sar_x", "sar_y", "sar_file_x", "sar_file_y",
                    "sar_map_x", "sar_map_y", "similarity", "inlier", "residual_px", "prior_residual_px"])
        for i in range(len(tp.optical_px)):
            om = opt_map[i] if opt_map is not None else (np.nan, np.nan)
            sm = sar_map[i] if sar_map is not None else (np.nan, np.nan)
            w.writerow([int(tp.tile[i]), *_f(tp.optical_px[i]), *_f(om), *_f(tp.sar_px[i]), *_f(tp.sar_file_px[i]),
                        *_f(sm), f"{tp.similarity[i]:.4f}", int(tp.inlier[i]), f"{tp.residual_px[i]:.3f}",
                        f"{tp.prior_residual_px[i]:.3f}"])


def _f(values: Any) -> list[str]:
    return [f"{float(v):.3f}" for v in values]


def write_tiepoints_geojson(path: Path, tp: TiePoints, optical: GeoInfo, sar_grid: GeoInfo) -> None:
    """GeoJSON FeatureCollection of the tie points at their optical map position (optical CRS).

    Geometry is in map coordinates of the optical CRS (written as a ``crs`` member; GeoJSON
    readers that assume WGS84 must reproject). Skipped (pixel geometry) when not georeferenced.
    """
    xy = pixel_to_map(optical.transform, tp.optical_px) if optical.georeferenced else tp.optical_px
    sar_map = pixel_to_map(sar_grid.transform, tp.sar_px) if sar_grid.georeferenced else None
    feats = []
    for i in range(len(xy)):
        props = {"tile": int(tp.tile[i]), "optical_x": float(tp.optical_px[i, 0]), "optical_y": float(tp.optical_px[i, 1]),
                 "sar_x": float(tp.sar_px[i, 0]), "sar_y": float(tp.sar_px[i, 1]),
                 "sar_file_x": float(tp.sar_file_px[i, 0]), "sar_file_y": float(tp.sar_file_px[i, 1]),
                 "similarity": float(tp.similarity[i]), "inlier": bool(tp.inlier[i]),
                 "residual_px": float(tp.residual_px[i]), "prior_residual_px": float(tp.prior_residual_px[i])}
        if sar_map is not None:
            props.update(sar_map_x=float(sar_map[i, 0]), sar_map_y=float(sar_map[i, 1]))
        feats.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(xy[i, 0]), float(xy[i, 1])]},
                      "properties": props})
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    if optical.georeferenced:
        doc["crs"] = {"type": "name", "properties": {"name": optical.crs.to_string()}}
    path.write_text(json.dumps(doc))


def write_gcp_vrt(path: Path, sar_path: Path, sar_file: GeoInfo, file_px: np.ndarray, map_xy: np.ndarray,
                  crs: Any) -> None:
    """A GDAL VRT over the SAR file carrying GCPs (SAR file pixel/line -> optical map X/Y).

    GDAL's GCP ``Pixel``/``Line`` use pixel-corner coordinates, so centre ``x`` is written as
    ``x + 0.5``. ``gdalwarp -tps`` (or ``-order 1/2``) on this VRT orthorectifies the SAR file
    onto the optical map.
    """
    wkt = escape(crs.to_wkt(), {'"': "&quot;"}) if crs else ""
    gcps = "\n".join(
        f'    <GCP Id="{i + 1}" Pixel="{p[0] + 0.5:.4f}" Line="{p[1] + 0.5:.4f}" X="{m[0]:.4f}" Y="{m[1]:.4f}" />'
        for i, (p, m) in enumerate(zip(file_px, map_xy)))
    vrt_type = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32", "int32": "Int32",
                "float32": "Float32", "float64": "Float64"}.get(sar_file.dtype, "Float32")
    nodata = f"    <NoDataValue>{sar_file.nodata}</NoDataValue>\n" if sar_file.nodata is not None else ""
    bands = "\n".join(
        f'  <VRTRasterBand dataType="{vrt_type}" band="{b}">\n{nodata}    <SimpleSource>\n'
        f'      <SourceFilename relativeToVRT="0">{escape(str(Path(sar_path).resolve()))}</SourceFilename>\n'
        f"      <SourceBand>{b}</SourceBand>\n    </SimpleSource>\n  </VRTRasterBand>"
        for b in range(1, sar_file.count + 1))
    path.write_text(f'<VRTDataset rasterXSize="{sar_file.width}" rasterYSize="{sar_file.height}">\n'
                    f'  <GCPList Projection="{wkt}">\n{gcps}\n  </GCPList>\n{bands}\n</VRTDataset>\n')


def rmse(values: np.ndarray) -> float | None:
    """Root mean square of ``values`` (``None`` when empty)."""
    v = np.asarray(values, np.float64)
    return float(np.sqrt(np.mean(v**2))) if len(v) else None
