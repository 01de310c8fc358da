"""From a fitted transform to products: warped SAR, tie points, result.json.

``matrix`` is always the 3x3 optical -> SAR pixel transform of a :class:`MatchResult`;
warping the SAR image onto the optical grid samples SAR at ``matrix @ p`` for every
optical pixel ``p``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from promptmid import viz
from promptmid.api import MatchResult
from promptmid.outputs import staged_products, write_json
from promptmid.geo import Grid
from promptmid.io import PreparedImage, RasterImage, open_for_write
from promptmid.geometry import residuals, warp_to_optical, warpable


PRODUCTS = ("result.json", "tiepoints.csv", "registered_sar.tif", "matches.png", "checkerboard.png", "report.html")


def write_tiepoints(path: Path, result: MatchResult) -> None:
    """CSV of all matches: optical (x, y), SAR (x, y), similarity, inlier flag, residual (SAR px)."""
    res = (residuals(result.transform, result.points0, result.points1)
           if result.transform is not None else np.full(len(result.points0), np.nan))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optical_x", "optical_y", "sar_x", "sar_y", "similarity", "inlier", "residual_px"])
        for p0, p1, s, inl, r in zip(result.points0, result.points1, result.scores, result.inliers, res):
            writer.writerow([f"{p0[0]:.3f}", f"{p0[1]:.3f}", f"{p1[0]:.3f}", f"{p1[1]:.3f}", f"{s:.4f}",
                             int(inl), f"{r:.3f}"])


def write_registered_sar(path: Path, matrix: np.ndarray, grid: Grid, sar: RasterImage) -> None:
    """Write the SAR raster resampled onto ``grid`` (the optical grid) as a (Geo)TIFF.

    Each ``grid`` pixel ``p`` samples ``sar`` at ``matrix @ p`` (``matrix``: 3x3 optical px -> SAR px). All SAR
    bands keep their dtype; pixels outside the SAR footprint get the nodata value (the SAR file's, else 0). CRS and
    geotransform come from ``grid`` when it has them. Tiled and DEFLATE-compressed.
    """
    nodata = sar.nodata if sar.nodata is not None else 0
    data, cast = warpable(sar.full().data)  # full resolution, also when matching read it decimated
    w, h = grid.width, grid.height
    bands = [cast(warp_to_optical(data[..., i], matrix, (w, h), fill=float(nodata)))
             for i in range(data.shape[-1])]
    profile = {
        "driver": "GTiff", "width": w, "height": h, "count": len(bands),
        "dtype": str(bands[0].dtype), "nodata": nodata, "compress": "deflate",
        "tiled": w >= 256 and h >= 256, "blockxsize": 256, "blockysize": 256,
    }
    if grid.crs:
        profile.update(crs=grid.crs, transform=grid.transform)
    with open_for_write(path, profile) as dst:
        dst.write(np.stack(bands))


def write_products(out: Path, result: MatchResult, opt: PreparedImage, sar: PreparedImage,
                   figures: bool = True, report: bool = True) -> dict[str, str]:
    """Write result.json, tiepoints.csv, report.html (unless ``report`` is False) and (on success) figures and
    registered_sar.tif, staged
    (:func:`staged_products`): complete or not at all, and nothing stale of an earlier run beside them.

    Returns:
        ``{product name: path}`` of what was written.
    """
    with staged_products(out, PRODUCTS) as staging:
        written = _write_all(staging, result, opt, sar, figures, report)
    return {k: str(out / v.name) for k, v in written.items()}


def _write_all(out: Path, result: MatchResult, opt: PreparedImage, sar: PreparedImage,
               figures: bool, report: bool = True) -> dict[str, Path]:
    paths = {"result": out / "result.json", "tiepoints": out / "tiepoints.csv"}
    optical_grid, sar_grid = Grid.of(opt.raster), Grid.of(sar.raster)
    write_tiepoints(paths["tiepoints"], result)
    if result.has_transform:
        paths["registered_sar"] = out / "registered_sar.tif"
        write_registered_sar(paths["registered_sar"], result.transform, optical_grid, sar.raster)
        if figures:
            paths["matches"] = out / "matches.png"
            paths["checkerboard"] = out / "checkerboard.png"
            viz.plot_matches(paths["matches"], result, opt, sar)
            viz.save_checkerboard(paths["checkerboard"], result, opt, sar)
    # the record every result shares (promptmid.fit), with the grids `promptmid apply` needs
    data = {**result.to_dict(), **result.fit(optical_grid, sar_grid).to_dict()}
    if report:
        paths["report"] = out / "report.html"
    data["outputs"] = {k: v.name for k, v in paths.items()}
    if report:
        from promptmid.report import write_match_report

        write_match_report(paths["report"], result, data, opt, sar)
    write_json(paths["result"], data)
    return paths
