"""Scene products: registered SAR GeoTIFF (block by block), tie points (CSV, GeoJSON), GCP VRT, tile map."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape
import json

import cv2
import numpy as np

from promptmid import geo
from promptmid.geo import Grid, pixel_to_map
from promptmid.geometry import translation, warp_to_optical
from promptmid.scene.grid import Tile
from promptmid.scene.model import GlobalModel
from promptmid.scene.windows import CV_DTYPES, clip_box, cv_ready, read_overview, read_window

def output_nodata(opt: geo.Grid, sar: geo.Grid) -> float:
    """Nodata of the registered SAR: the optical nodata when the SAR dtype can hold it, else the SAR's, else 0."""
    for value in (opt.nodata, sar.nodata):
        if value is not None and (np.dtype(sar.dtype).kind == "f" or
                                  (float(value).is_integer() and np.can_cast(np.min_scalar_type(value), sar.dtype))):
            return float(value)
    return 0.0


GDAL_CACHE_MB = 256  # GDAL block cache while writing the registered scene (MB)


def write_registered_scene(path: Path, model: GlobalModel, opt: geo.Grid, sar_ds: Any, block: int = 1024) -> None:
    """Write the SAR resampled onto the optical grid, block by block (tiled, DEFLATE, BigTIFF if needed).

    CRS/geotransform come from the optical image, nodata from :func:`output_nodata`; dtype and
    bands from the SAR. Only the SAR window under each output block is read.
    """
    import rasterio
    from rasterio.windows import Window

    sar = geo.geo_info(sar_ds)
    nodata = output_nodata(opt, sar)
    dtype = sar.dtype if sar.dtype in CV_DTYPES else "float32"
    profile = {"driver": "GTiff", "width": opt.width, "height": opt.height, "count": sar.count, "dtype": dtype,
               "nodata": nodata, "compress": "deflate", "tiled": True, "blockxsize": 256, "blockysize": 256,
               "BIGTIFF": "IF_SAFER"}
    if opt.georeferenced:
        profile.update(crs=opt.crs, transform=opt.transform)
    # GDAL's block cache defaults to 5% of RAM; cap it so memory stays bounded for any scene size
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB), rasterio.open(path, "w", **profile) as dst:
        for by in range(0, opt.height, block):
            for bx in range(0, opt.width, block):
                bw, bh = min(block, opt.width - bx), min(block, opt.height - by)
                out = _warp_block(model, sar_ds, bx, by, bw, bh, nodata, dtype)
                dst.write(np.moveaxis(out, -1, 0), window=Window(bx, by, bw, bh))


def _warp_block(model: GlobalModel, sar_ds: Any, bx: int, by: int, bw: int, bh: int, fill: float,
                dtype: str) -> np.ndarray:
    if model.kind == "affine":
        corners = np.array([[bx, by], [bx + bw - 1, by], [bx, by + bh - 1], [bx + bw - 1, by + bh - 1]], float)
        sar_pts, maps = model.apply(corners), None
    else:
        yy, xx = np.mgrid[by:by + bh, bx:bx + bw]
        sar_pts = model.apply(np.stack([xx.ravel(), yy.ravel()], 1))
        maps = sar_pts.reshape(bh, bw, 2).astype(np.float32)
    window = clip_box(sar_pts, sar_ds.width, sar_ds.height)
    if window is None:
        return np.full((bh, bw, sar_ds.count), fill, dtype)
    sx0, sy0, sw, sh = window
    data = cv_ready(read_window(sar_ds, sx0, sy0, sw, sh)).astype(dtype, copy=False)
    if maps is None:
        m = translation(-sx0, -sy0) @ model.matrix @ translation(bx, by)
        bands = [warp_to_optical(data[..., i], m, (bw, bh), fill=fill) for i in range(data.shape[-1])]
    else:
        mx, my = maps[..., 0] - sx0, maps[..., 1] - sy0
        bands = [cv2.remap(data[..., i], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
                 for i in range(data.shape[-1])]
    return np.stack(bands, -1)


def plot_tile_map(path: Path, opt_ds: Any, tiles: list[Tile], tp: TiePoints, bands: list[int] | None = None,
                  max_side: int = 900, verdict: str = "") -> None:
    """Figure: optical overview (``bands``, 1-based, as matched), tiles coloured by status and QC verdict with
    inlier counts, tie points (green = inlier); ``verdict`` (the scene's) goes into the title."""
    from promptmid.outputs import pyplot

    plt = pyplot()
    from matplotlib.patches import Rectangle

    from promptmid.io import optical_to_unit

    data, to_full = read_overview(opt_ds, max_side)
    if bands:
        data = data[..., [b - 1 for b in bands]]
    img = optical_to_unit(np.nan_to_num(data), np.ones(data.shape[:2], bool))
    f = 1.0 / to_full[0, 0], 1.0 / to_full[1, 1]
    colours = {"ok": "lime", "failed": "red", "rejected": "orange", "empty": "grey", "outside": "grey", "error": "magenta"}
    fig, ax = plt.subplots(figsize=(8, 8 * img.shape[0] / img.shape[1]))
    ax.imshow(img)
    for t in tiles:
        c = "yellow" if t.status == "ok" and t.verdict == "uncertain" else colours.get(t.status, "white")
        ax.add_patch(Rectangle((t.x0 * f[0], t.y0 * f[1]), t.w * f[0], t.h * f[1], fill=False, edgecolor=c, lw=1.2))
        ax.text((t.x0 + t.w / 2) * f[0], (t.y0 + t.h / 2) * f[1], f"{t.index}\n{t.global_inliers}/{t.inliers}",
                color=c, ha="center", va="center", fontsize=7)
    pts = (tp.optical_px + 0.5) * f - 0.5
    ax.scatter(pts[tp.inlier, 0], pts[tp.inlier, 1], s=2, c="lime")
    ax.scatter(pts[~tp.inlier, 0], pts[~tp.inlier, 1], s=2, c="red")
    ax.set_title((f"scene verdict {verdict}\n" if verdict else "") + "tiles: index, global/tile inliers (green ok, "
                 "yellow fitted but uncertain, red failed, orange rejected, grey empty)", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


def write_tiepoints_csv(path: Path, tp: TiePoints, optical: Grid, sar_grid: Grid) -> None:
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


def write_tiepoints_geojson(path: Path, tp: TiePoints, optical: Grid, sar_grid: Grid) -> None:
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


def write_gcp_vrt(path: Path, sar_path: Path, sar_file: Grid, file_px: np.ndarray, map_xy: np.ndarray,
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
