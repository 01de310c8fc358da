"""Command-line interface (typer): a thin layer over :mod:`promptmid.api`.

Every user error prints one line on stderr and exits with a non-zero code
(see :mod:`promptmid.errors`); set ``PROMPTMID_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from promptmid.commands import register_all
from promptmid.commands.common import (
    AggregatorOpt, AlwaysSearchOpt, DmEnsembleOpt, DmLoraOpt, DmOpt, JsonOpt, LandUseOpt, MaxSideOpt, MinInliersOpt,
    ModelOpt, NanOpt, OpticalBandsOpt, OverwriteOpt, PresetOpt, QuietOpt, RotOpt, RotStepOpt, SarBandsOpt, SarScaleOpt,
    SearchOpt, SearchFeaturesOpt, SearchRotOpt, SearchScaleOpt, ThreadsOpt,
    StrictOpt, ThresholdOpt, TopKOpt, build_overrides, err_console, fail, resolve_preset, add_command, out_console,
    set_threads, status, uncertain, verdict_markup,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Register optical and SAR images with modality-invariant descriptors (PromptMID).")


def match(
    optical: Path = typer.Argument(..., help="Optical image (PNG/JPEG/TIFF/GeoTIFF; bands: --optical-bands)."),
    sar: Path = typer.Argument(..., help="SAR image (amplitude or intensity, any dtype)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    preset: str = PresetOpt,
    model: Optional[str] = ModelOpt,
    threshold: Optional[float] = ThresholdOpt,
    min_inliers: Optional[int] = MinInliersOpt,
    try_rotations: bool = RotOpt,
    rotation_step: Optional[float] = RotStepOpt,
    search: Optional[bool] = SearchOpt,
    always_search: bool = AlwaysSearchOpt,
    search_rotation: Optional[float] = SearchRotOpt,
    search_scale: Optional[str] = SearchScaleOpt,
    search_features: Optional[str] = SearchFeaturesOpt,
    top_k: Optional[int] = TopKOpt,
    max_side: Optional[int] = MaxSideOpt,
    sar_scale: Optional[str] = SarScaleOpt,
    nan_as_nodata: bool = NanOpt,
    optical_bands: Optional[str] = OpticalBandsOpt,
    sar_bands: Optional[str] = SarBandsOpt,
    aggregator: Optional[str] = AggregatorOpt,
    dm: Optional[str] = DmOpt,
    dm_lora: Optional[str] = DmLoraOpt,
    land_use: Optional[str] = LandUseOpt,
    dm_ensemble: Optional[int] = DmEnsembleOpt,
    no_figures: bool = typer.Option(False, "--no-figures", help="Skip matches.png and checkerboard.png."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip report.html (the page to check the result by eye)."),
    threads: Optional[int] = ThreadsOpt,
    overwrite: bool = OverwriteOpt,
    strict: bool = StrictOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Register SAR to OPTICAL; write result.json, tiepoints.csv, figures and registered_sar.tif."""
    from promptmid.io import check_image_path

    for path in (optical, sar):  # argument errors answer before torch and the models are imported
        check_image_path(path)
    overrides = build_overrides(model=model, threshold=threshold, min_inliers=min_inliers, try_rotations=try_rotations,
                                rotation_step=rotation_step, top_k=top_k, max_side=max_side,
                                sar_scale=sar_scale, nan_as_nodata=nan_as_nodata, optical_bands=optical_bands,
                                sar_bands=sar_bands, aggregator=aggregator,
                                dm=dm, dm_lora=dm_lora, land_use=land_use, dm_ensemble=dm_ensemble,
                                search=search, always_search=always_search, search_rotation=search_rotation,
                                search_scale=search_scale, search_features=search_features)
    from promptmid.api import Matcher
    from promptmid.config import get_config
    from promptmid.io import load_image
    from promptmid.outputs import prepare_out_dir, refuse_inputs_among_products
    from promptmid.registration import PRODUCTS, write_products

    set_threads(threads)
    refuse_inputs_among_products(out, optical, sar, products=PRODUCTS)
    preset = resolve_preset(preset, dm, aggregator)
    io_conf = get_config(preset, overrides)["io"]
    opt_img, sar_img = load_image(optical, "optical", **io_conf), load_image(sar, "sar", **io_conf)
    out_dir = prepare_out_dir(out, overwrite)
    quiet = quiet or json_out
    if not quiet and max(*opt_img.original_size, *sar_img.original_size) > 4 * io_conf["max_side"]:
        err_console.print("tip: these are large images, matched at reduced resolution; `promptmid scene` "
                          "registers large or georeferenced scenes tile by tile at full resolution.")
    with status(quiet) as progress:
        progress("loading models")
        matcher = Matcher(preset, overrides)
        result = matcher.match(opt_img, sar_img, progress=progress)
        progress("writing outputs")
        write_products(out_dir, result, opt_img, sar_img, not no_figures, not no_report)
    report(result, out_dir, quiet, json_out, strict)


def report(result: Any, out_dir: Path, quiet: bool, json_out: bool, strict: bool = False) -> None:
    """Print the outcome; after writing result.json exit 5 when registration failed, and warn (``strict``:
    exit 6) when the verdict is uncertain."""
    if json_out:
        print((out_dir / "result.json").read_text())
    tip = rotation_tip(result.status, result.config)
    if tip and not quiet:
        err_console.print(f"tip: {tip}", highlight=False, soft_wrap=True)
    if not result.has_transform:
        fail(f"registration failed: {result.reason} (see {out_dir / 'result.json'})", 5)
    if not quiet:
        _print_table(result, out_dir)
    if result.status == "uncertain":
        uncertain(f"verdict uncertain (confidence {result.confidence:.2f}): {result.reason}; check "
                  f"{out_dir / 'checkerboard.png'}", strict)


def rotation_tip(status: str, config: dict[str, Any]) -> str | None:
    """Advice for a result that is not ``ok`` when the SAR may be rotated beyond what was searched: the keypoints
    tried one orientation (``geometry.rotations``) and the area search only +-``search.rotation_range`` degrees.
    ``None`` when the verdict is ``ok`` or every rotation was already tried. ``config``: the result's config."""
    if status == "ok" or len(config.get("geometry", {}).get("rotations", [0.0])) > 1:
        return None
    search = config.get("search", {})
    searched = float(search.get("rotation_range", 0.0)) if search.get("enabled") else 0.0
    if searched >= 180.0:
        return None
    tried = (f"only SAR rotations within +-{searched:g} deg of the optical image were tried" if searched > 0
             else "only the SAR as oriented was tried")
    return f"{tried}; if it may be rotated further (e.g. radar geometry, or north not up), rerun with --try-rotations"


def _hypotheses_text(result: Any) -> str:
    """Which hypothesis was kept, and what the pick weighed: each candidate's pick score (the highest that is not
    failed wins) and its QC confidence."""
    if not result.hypotheses:
        return "-"
    if len(result.hypotheses) == 1:
        return f"{result.hypothesis or 'none'} (the only candidate)"

    def score(h: dict[str, Any]) -> str:
        pick = "n/a" if h.get("pick_score") is None else f"{h['pick_score']:.2f}"
        return f"{h['source']} {pick} ({h['confidence']:.2f}{', failed' if h['status'] == 'failed' else ''})"

    return (f"{result.hypothesis or 'none'}; pick score (QC confidence) of each candidate: "
            + ", ".join(score(h) for h in result.hypotheses))


def _print_table(result: Any, out_dir: Path) -> None:
    from promptmid.geometry import format_matrix  # numpy and OpenCV: not needed for --help

    table = Table(title=f"promptmid {result.config.get('preset')} -> {out_dir}", show_header=False)
    rows = [
        ("verdict", verdict_markup(result.status, result.confidence)),
        ("transform (optical px -> SAR px)", format_matrix(result.transform)),
        ("matches / agreeing (inliers)",
         f"{len(result.points0)} / {result.num_inliers} ({result.num_inliers / max(1, len(result.points0)):.0%})"),
        ("residual RMSE", f"{result.rmse:.2f} SAR px"),
        ("inlier coverage", f"{result.coverage():.0%} of the optical image"),
        ("SAR rotation tried/kept", f"{result.rotation_deg:g} deg"),
        ("transform from", _hypotheses_text(result)),
        ("area-based refinement", _refinement_text(result.refinement)),
        ("QC evidence", _evidence_text(result.qc.get("evidence", {}))),
        ("time", ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())),
    ]
    for k, v in rows:
        table.add_row(k, v)
    out_console.print(table)


def _evidence_text(ev: dict[str, Any]) -> str:
    """The main QC evidence in one line (all of it is in result.json under ``qc``)."""
    if not ev:
        return "none (no transform)"
    offset = ev.get("dense_offset_px")
    return (f"dense correlation peak {'n/a' if offset is None else f'{offset:.1f} px'} from the transform, "
            f"distinctness {ev.get('dense_distinctness') or 0:.2f}; "
            f"{ev.get('refine_inlier_ratio') or 0:.0%} of refinement blocks agree")


def _refinement_text(ref: dict[str, Any] | None) -> str:
    if ref is None:
        return "off"
    if not ref["applied"]:
        return f"not applied ({ref['reason']})"
    return f"applied: {ref['inliers']} of {ref['blocks']} blocks agree"


def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Output directory."),
    preset: str = PresetOpt,
    seed: int = typer.Option(7, "--seed", help="Seed of the generated scene and transform."),
    size: int = typer.Option(512, "--size", help="Side of the generated images (px)."),
    threads: Optional[int] = ThreadsOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Generate an optical/SAR pair with a known affine transform, register it, report the error."""
    from promptmid.demo import run_demo

    set_threads(threads)
    summary = run_demo(out, preset=preset, seed=seed, size=size, overwrite=overwrite, quiet=quiet)
    if not quiet:
        out_console.print(summary["text"])
    if summary["status"] != "ok" or summary["mean_corner_error_px"] > 5.0:
        fail(f"demo did not register within 5 px: {summary.get('reason') or summary['mean_corner_error_px']}", 5)


def models(
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check each weight file's sha256."),
    json_out: bool = JsonOpt,
) -> None:
    """List every model: source package and version, checksum, cache path, readiness."""
    from promptmid.models.status import all_models

    rows = all_models(verify)
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="promptmid models")
    for col in ("name", "source", "sha256", "licence", "ready", "cache / message"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["source"], r["sha256"], r["licence"], "yes" if r["ready"] else "[red]no[/]",
                      (r["cache_path"] or "") + "\n" + r["message"])
    out_console.print(table)
    if not all(r["ready"] for r in rows):
        raise typer.Exit(4)


for _name, _func in (("match", match), ("demo", demo), ("models", models)):
    add_command(app, _name, _func)
register_all(app)


def main() -> None:
    """Console-script entry point: runs the command, then ends the process at once (:func:`exit_now`).

    The interpreter's own exit tears down torch, ONNX Runtime and every module loaded, about 0.5 s of a 5 s
    ``promptmid match`` (``benchmarks/results/speed.md``); by the time a command returns, everything it wrote is
    closed (products are staged and moved into place, rasters are written in ``with`` blocks, the Dask client and
    cluster are closed in ``finally``). ``PROMPTMID_CLEAN_EXIT=1`` keeps the normal interpreter exit."""
    try:
        app()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    if os.environ.get("PROMPTMID_CLEAN_EXIT", "") not in ("", "0"):
        sys.exit(code)
    exit_now(code)


def exit_now(code: Any) -> None:
    """End the process with ``code`` as :func:`sys.exit` would (``None``: 0; an int: itself; anything else: printed
    to stderr, 1), after flushing logging, stdout and stderr, without the interpreter's teardown (``os._exit``)."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
