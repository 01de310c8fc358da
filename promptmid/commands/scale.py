"""CLI for real scenes: ``promptmid scene`` (tiled / georeferenced) and ``promptmid batch`` (Dask)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from promptmid.commands.common import (
    JsonOpt, NanOpt, OpticalBandsOpt, OverwriteOpt, PresetOpt, QuietOpt, SarBandsOpt, SarScaleOpt, StrictOpt, ThreadsOpt,
    ThresholdOpt, TopKOpt, build_overrides, err_console, add_command, fail, out_console, set_threads, status, uncertain,
    verdict_markup,
)
from promptmid.errors import InputError

GeoPriorOpt = typer.Option(True, "--geo-prior/--no-geo-prior",
                           help="Use the geotransforms as prior when both images are georeferenced "
                                "(else: coarse match of overviews).")
RadiusOpt = typer.Option("auto", "--search-radius",
                         help="Search radius around the prior: '64px', '500m', a number (metres if georeferenced) or "
                              "auto (the larger of 64 px and 150 m).")
SceneModelOpt = typer.Option("affine", "--geometry", "--model", "-m", help="Global transform family: affine | poly2 "
                             "(2nd-order polynomial). (--model is a deprecated alias, to be removed in the next release.)")
GridOpt = typer.Option("optical", "--grid", help="Working and output grid: optical (the optical image's own) or utm "
                       "(the optical reprojected to its local UTM zone: square metre pixels for a geographic CRS).")
TileOpt = typer.Option(1024, "--tile", help="Tile side on the optical image (px).")
OverlapOpt = typer.Option(128, "--overlap", help="Overlap between neighbouring tiles (px).")
MaxTilesOpt = typer.Option(64, "--max-tiles", help="At most this many tiles, spread over the scene (0 = all).")
SettleOpt = typer.Option(12, "--settle", help="Stop matching tiles once this many agree on the global model and "
                         "spread over the scene (tiles are matched spread-first); 0 = match all --max-tiles tiles.")
NoFigOpt = typer.Option(False, "--no-figures", help="Skip tile_map.png.")
NoReportOpt = typer.Option(False, "--no-report", help="Skip report.html (the page to check the result by eye).")


def _scene_options(model: str, tile: int, overlap: int, max_tiles: int, geo_prior: bool, search_radius: str,
                   no_figures: bool, grid: str = "optical", no_report: bool = False, settle: int = 12) -> dict[str, Any]:
    from promptmid.scene.pipeline import GRIDS

    if grid not in GRIDS:  # checked before the output directory is made
        raise InputError(f"Unknown --grid {grid!r}; valid: {', '.join(GRIDS)}.")
    if settle < 0 or max_tiles < 0:
        raise InputError(f"--settle and --max-tiles must be >= 0 (got {settle}, {max_tiles}).")
    return {"model": model, "tile": tile, "overlap": overlap, "max_tiles": max_tiles or None, "settle": settle or None,
            "geo_prior": geo_prior, "search_radius": search_radius, "figures": not no_figures, "grid": grid,
            "report": not no_report}


def _overrides(tile: int, threshold: Optional[float], top_k: Optional[int], **inputs: Any) -> dict[str, Any]:
    """Matcher overrides of a scene; ``inputs``: sar_scale, nan_as_nodata, optical_bands, sar_bands (as in match)."""
    # tiles are matched at full resolution (chips are at most tile + 2 * radius; cap keeps memory bounded)
    return build_overrides(threshold=threshold, top_k=top_k, max_side=max(1024, min(2 * tile, 4096)), **inputs)


def scene(
    optical: Path = typer.Argument(..., help="Optical scene (GeoTIFF or any raster, any size)."),
    sar: Path = typer.Argument(..., help="SAR scene (amplitude/intensity; any CRS, reprojected if needed)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    preset: str = PresetOpt,
    geo_prior: bool = GeoPriorOpt,
    grid: str = GridOpt,
    search_radius: str = RadiusOpt,
    model: str = SceneModelOpt,
    tile: int = TileOpt,
    overlap: int = OverlapOpt,
    max_tiles: int = MaxTilesOpt,
    settle: int = SettleOpt,
    threshold: Optional[float] = ThresholdOpt,
    top_k: Optional[int] = TopKOpt,
    sar_scale: Optional[str] = SarScaleOpt,
    nan_as_nodata: bool = NanOpt,
    optical_bands: Optional[str] = OpticalBandsOpt,
    sar_bands: Optional[str] = SarBandsOpt,
    no_figures: bool = NoFigOpt,
    no_report: bool = NoReportOpt,
    threads: Optional[int] = ThreadsOpt,
    overwrite: bool = OverwriteOpt,
    strict: bool = StrictOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Register a large or georeferenced SAR scene to an optical scene, tile by tile.

    Writes registered_sar.tif (optical grid, CRS, geotransform), tiepoints.csv/.geojson (pixel and map
    coordinates, residuals), sar_gcps.vrt, tile_map.png and result.json (RMSE before/after, per-tile QC).
    """
    from promptmid.api import Matcher
    from promptmid.outputs import prepare_out_dir, refuse_inputs_among_products
    from promptmid.scene import SCENE_PRODUCTS, SceneOptions, register_scene

    set_threads(threads)
    opts = SceneOptions(**_scene_options(model, tile, overlap, max_tiles, geo_prior, search_radius, no_figures, grid,
                                         no_report, settle))
    overrides = _overrides(tile, threshold, top_k, sar_scale=sar_scale, nan_as_nodata=nan_as_nodata,
                           optical_bands=optical_bands, sar_bands=sar_bands)
    refuse_inputs_among_products(out, optical, sar, products=SCENE_PRODUCTS)  # before any work (exit 3)
    out_dir = prepare_out_dir(out, overwrite)
    quiet = quiet or json_out
    with status(quiet) as progress:
        progress("loading models")
        matcher = Matcher(preset, overrides)
        scene_result = register_scene(optical, sar, out_dir, matcher, opts, progress)
    fit = scene_result.fit  # the record the CLI decides on (the same keys as result.json)
    if json_out:
        print((out_dir / "result.json").read_text())
    if not fit.has_transform:
        fail(f"registration failed: {fit.reason} (see {out_dir / 'result.json'})", 5)
    if not quiet:
        _print_scene(scene_result.to_dict(), out_dir)
    if fit.status == "uncertain":
        check = "report.html" if opts.report else "tile_map.png"
        uncertain(f"verdict uncertain (confidence {fit.confidence:.2f}): {fit.reason}; check {out_dir / check}",
                  strict)


def _print_scene(r: dict[str, Any], out_dir: Path) -> None:
    from promptmid.geometry import format_matrix  # numpy and OpenCV: not needed for --help

    table = Table(title=f"promptmid scene -> {out_dir}", show_header=False)
    fmt = lambda v, unit: "n/a" if v is None else f"{v:.2f} {unit}"  # noqa: E731
    verdicts = [t.get("verdict") for t in r["tile_qc"] if t.get("agrees")]
    rows = [
        ("verdict", verdict_markup(r["status"], r["confidence"]) + "; agreeing tiles: "
                    + ", ".join(f"{verdicts.count(v)} {v}" for v in ("ok", "uncertain") if v in verdicts)),
        ("transform (optical px -> SAR px)", format_matrix(r["transform"])),
        ("prior", r["prior"]["kind"] + (" (SAR reprojected to optical CRS)" if r["sar_grid"]["reprojected_to_optical_crs"] else "")),
        ("tiles processed / grid", f"{r['tiles']['processed']} / {r['tiles']['grid']}  "
                                   f"(ok {sum(t['status'] == 'ok' for t in r['tile_qc'])}"
                                   + (f"; settled: stopped before {r['tiles']['selected']})" if r['tiles'].get('settled')
                                      else ")")),
        ("tie points / inliers", f"{r['tiepoints']} / {r['inliers']}"),
        ("tiles agreeing", _agreement_text(r.get("agreement"))),
        ("RMSE before -> after", f"{fmt(r['rmse_before_px'], 'px')} -> {fmt(r['rmse_after_px'], 'px')}"
                                  + (f"  ({fmt(r['rmse_before_m'], 'm')} -> {fmt(r['rmse_after_m'], 'm')})"
                                     if r.get("rmse_after_m") is not None else "")),
        ("correction (model vs prior)", fmt(r.get("correction_px"), "px")
         + (f"  ({fmt(r['correction_m'], 'm')})" if r.get("correction_m") is not None else "")),
        ("time", ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items())),
    ]
    for k, v in rows:
        table.add_row(k, v)
    out_console.print(table)


def _agreement_text(ag: dict[str, Any] | None) -> str:
    if not ag:
        return "n/a"
    return (f"{len(ag['tiles_agreeing'])} of {ag['tiles_fitted']} fitted (within {ag['agree_px']:g} px)"
            + (f", {len(ag['tiles_rejected_by_prior'])} rejected by the prior" if ag["tiles_rejected_by_prior"] else ""))


def batch(
    pairs: Path = typer.Argument(..., help="PAIRS.jsonl: one {\"id\", \"optical\", \"sar\"} object per line."),
    out: Path = typer.Option(..., "--out", "-o", help="Output root; one sub-directory per pair id."),
    workers: int = typer.Option(2, "--workers", "-w", help="LocalCluster worker processes."),
    threads_per_worker: int = typer.Option(1, "--threads-per-worker", help="Dask threads per worker."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Existing Dask scheduler, tcp://host:port."),
    preset: str = PresetOpt,
    geo_prior: bool = GeoPriorOpt,
    grid: str = GridOpt,
    search_radius: str = RadiusOpt,
    model: str = SceneModelOpt,
    tile: int = TileOpt,
    overlap: int = OverlapOpt,
    max_tiles: int = MaxTilesOpt,
    settle: int = SettleOpt,
    threshold: Optional[float] = ThresholdOpt,
    top_k: Optional[int] = TopKOpt,
    sar_scale: Optional[str] = SarScaleOpt,
    nan_as_nodata: bool = NanOpt,
    optical_bands: Optional[str] = OpticalBandsOpt,
    sar_bands: Optional[str] = SarBandsOpt,
    no_figures: bool = NoFigOpt,
    no_report: bool = NoReportOpt,
    threads: int = typer.Option(1, "--threads", help="torch threads per worker."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Also rerun pairs whose last run failed to register."),
    strict: bool = StrictOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Register many pairs on Dask; resumable (finished pairs are skipped), failures reported per pair."""
    from promptmid.distributed import BatchOptions, run_batch, summary_rows

    opts = BatchOptions(preset, _overrides(tile, threshold, top_k, sar_scale=sar_scale, nan_as_nodata=nan_as_nodata,
                                           optical_bands=optical_bands, sar_bands=sar_bands),
                        _scene_options(model, tile, overlap, max_tiles, geo_prior, search_radius, no_figures, grid,
                                       no_report, settle),
                        threads, retry_failed)
    quiet = quiet or json_out
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, disable=quiet) as bar:
        task = bar.add_task("pairs", total=None)

        def on_done(row: dict[str, Any], done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"{row['id']}: {row['status']}")

        summary = run_batch(pairs, out, opts, workers, threads_per_worker, scheduler, on_done)
    if json_out:
        print(json.dumps(summary, indent=2, default=str))
    elif not quiet:
        table = Table(title=f"promptmid batch -> {out}")
        for col in ("id", "verdict (confidence)", "tiles", "inliers", "RMSE px", "s", "reason"):
            table.add_column(col, overflow="fold")
        for row in summary_rows(summary):
            table.add_row(*row)
        out_console.print(table)
    counts = summary["counts"]
    bad = counts["failed"] + counts["error"]
    if bad:
        fail(f"{bad} of {len(summary['pairs'])} pairs did not register (see {out / 'summary.json'})", 5)
    if counts["uncertain"]:
        uncertain(f"{counts['uncertain']} of {len(summary['pairs'])} pairs registered with verdict uncertain "
                  f"(check them; see {out / 'summary.json'})", strict)


def register(app: typer.Typer) -> None:
    """Add ``scene`` and ``batch`` to the app."""
    add_command(app, "scene", scene)
    add_command(app, "batch", batch)
