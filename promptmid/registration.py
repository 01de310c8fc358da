"""From a fitted transform to products: warped SAR, tie points, result.json.

``matrix`` is always the 3x3 optical -> SAR pixel transform of a :class:`MatchResult`;
warping the SAR image onto the optical grid samples SAR at ``matrix @ p`` for every
optical pixel ``p``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from promptmid import viz
from promptmid.api import MatchResult
from promptmid.errors import OutputExistsError
from promptmid.geo import Grid
from promptmid.io import PreparedImage, RasterImage, open_for_write
from promptmid.geometry import residuals, warp_to_optical, warpable


PRODUCTS = ("result.json", "tiepoints.csv", "registered_sar.tif", "matches.png", "checkerboard.png", "report.html")


def refuse_inputs_among_products(out: str | Path, *inputs: str | Path, products: tuple[str, ...] = PRODUCTS) -> None:
    """Refuse (exit 3) when an input file is one of the products that would be written into ``out``.

    Raises:
        OutputExistsError: naming the input that would be overwritten.
    """
    targets = {(Path(out) / name).resolve() for name in products}
    for item in inputs:
        if isinstance(item, (str, Path)) and Path(item).resolve() in targets:
            raise OutputExistsError(f"{item} is an input and would be overwritten by an output of the same name in "
                                    f"{out}; choose another --out.")


STAGING_PREFIXES = (".promptmid-products-", ".promptmid-write-test-")  # our hidden staging entries in --out


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Create ``out``; refuse a non-empty existing directory unless ``overwrite``.

    Hidden staging folders left by a killed run of ours do not count as content; ``overwrite`` removes them.

    Raises:
        OutputExistsError: ``out`` exists (non-empty, or is a file) and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory.")
    ours = [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIXES)] if out.exists() else []
    if out.exists() and any(p not in ours for p in out.iterdir()) and not overwrite:
        raise OutputExistsError(f"Output directory {out} exists and is not empty; pass --overwrite to replace its files.")
    for stale in ours if overwrite else ():  # a killed run's staging: ours, hidden, never a user's file
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".promptmid-write-test-"):
            pass  # checked before any work is done, not after a long registration
    except OSError as exc:
        raise OutputExistsError(f"Output directory {out} is not writable: {exc.strerror or exc}.") from None
    return out


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


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
    shutil.move(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


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


@contextmanager
def staged_products(out: Path, products: tuple[str, ...]) -> Iterator[Path]:
    """A hidden staging folder in ``out`` to write products into; when the block ends without error, every file
    named in ``products`` is removed from ``out`` (an earlier run's products that this run does not write, e.g. the
    registered SAR of a pair that now fails) and the staged files are moved into place, ``result.json`` last. On
    an error (or a kill) ``out`` keeps what it had; the staging folder is removed (or ignored and cleared by
    :func:`prepare_out_dir` after a kill)."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIXES[0]))
    try:
        yield staging
        for name in products:
            (out / name).unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "result.json"):  # result.json last
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_all(out: Path, result: MatchResult, opt: PreparedImage, sar: PreparedImage,
               figures: bool, report: bool = True) -> dict[str, Path]:
    paths = {"result": out / "result.json", "tiepoints": out / "tiepoints.csv"}
    write_tiepoints(paths["tiepoints"], result)
    if result.has_transform:
        paths["registered_sar"] = out / "registered_sar.tif"
        write_registered_sar(paths["registered_sar"], result.transform, Grid.of(opt.raster), sar.raster)
        if figures:
            paths["matches"] = out / "matches.png"
            paths["checkerboard"] = out / "checkerboard.png"
            viz.plot_matches(paths["matches"], result, opt, sar)
            viz.save_checkerboard(paths["checkerboard"], result, opt, sar)
    # the record every result shares (promptmid.fit), with the grids `promptmid apply` needs
    data = {**result.to_dict(), **result.fit(Grid.of(opt.raster), Grid.of(sar.raster)).to_dict()}
    if report:
        paths["report"] = out / "report.html"
    data["outputs"] = {k: v.name for k, v in paths.items()}
    if report:
        from promptmid.report import write_match_report

        write_match_report(paths["report"], result, data, opt, sar)
    write_json(paths["result"], data)
    return paths
