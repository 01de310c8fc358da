"""Command-line interface (typer): a thin layer over :mod:`promptmid.api`.

Every user error prints one line on stderr and exits with a non-zero code
(see :mod:`promptmid.errors`); set ``PROMPTMID_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from promptmid.errors import PromptMIDError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Register optical and SAR images with modality-invariant descriptors (PromptMID).")
err_console = Console(stderr=True)
out_console = Console()


def fail(message: str, code: int = 1) -> None:
    """Print one error line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into one stderr line and an exit code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("PROMPTMID_DEBUG"):
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except PromptMIDError as exc:
            fail(str(exc), exc.exit_code)
        except ValueError as exc:
            fail(str(exc), 2)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
            fail(f"unexpected {type(exc).__name__}: {exc} (set PROMPTMID_DEBUG=1 for the traceback)", 1)

    return wrapper


@contextmanager
def status(quiet: bool) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr whose message the pipeline updates (silent when ``quiet``)."""
    if quiet:
        yield lambda _msg: None
        return
    with err_console.status("starting") as st:
        yield lambda msg: st.update(msg)


def build_overrides(**opts: Any) -> dict[str, Any]:
    """Map CLI options onto nested config overrides (``None`` = keep the preset's value)."""
    o: dict[str, Any] = {"io": {}, "keypoints": {}, "geometry": {}, "matching": {}}
    mapping = {
        "model": ("geometry", "model"), "threshold": ("geometry", "threshold"),
        "min_inliers": ("geometry", "min_inliers"), "top_k": ("keypoints", "top_k"),
        "detector": ("keypoints", "detector"), "max_side": ("io", "max_side"),
        "sar_scale": ("io", "sar_scale"), "ratio": ("matching", "ratio"),
    }
    for name, (section, key) in mapping.items():
        if opts.get(name) is not None:
            o[section][key] = opts[name]
    if opts.get("nan_as_nodata"):
        o["io"]["nan_as_nodata"] = True
    if opts.get("try_rotations"):
        from promptmid.api import rotation_steps

        o["geometry"]["rotations"] = rotation_steps(opts.get("rotation_step") or 90.0)
    if opts.get("aggregator") == "none":
        o["aggregator"] = {"name": "concat"}
    return o


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# Options shared by every command that builds descriptors.
PresetOpt = typer.Option("lite", "--preset", "-p", help="Pipeline preset: lite | xfeat | full.")
ModelOpt = typer.Option(None, "--model", "-m", help="Geometry model: affine (default) | homography | similarity.")
ThresholdOpt = typer.Option(None, "--threshold", help="Inlier threshold in SAR pixels (default 3).")
RotOpt = typer.Option(False, "--try-rotations", help="Also try the SAR image rotated (steps of --rotation-step).")
RotStepOpt = typer.Option(None, "--rotation-step", help="Rotation step in degrees for --try-rotations (default 90).")
TopKOpt = typer.Option(None, "--top-k", help="Keypoints per image (default 2048).")
MaxSideOpt = typer.Option(None, "--max-side", help="Working resolution: long side in px (default 1024).")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads for torch (default: all).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")
JsonOpt = typer.Option(False, "--json", help="Print result.json on stdout.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace files in an existing output directory.")


@app.command()
@handle_errors
def match(
    optical: Path = typer.Argument(..., help="Optical image (PNG/JPEG/TIFF/GeoTIFF, 1-4 bands)."),
    sar: Path = typer.Argument(..., help="SAR image (amplitude or intensity, any dtype)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    preset: str = PresetOpt,
    model: Optional[str] = ModelOpt,
    threshold: Optional[float] = ThresholdOpt,
    try_rotations: bool = RotOpt,
    rotation_step: Optional[float] = RotStepOpt,
    top_k: Optional[int] = TopKOpt,
    max_side: Optional[int] = MaxSideOpt,
    sar_scale: Optional[str] = typer.Option(None, "--sar-scale", help="SAR scaling: auto | log | linear."),
    nan_as_nodata: bool = typer.Option(False, "--nan-as-nodata", help="Treat NaN/inf pixels as nodata."),
    no_figures: bool = typer.Option(False, "--no-figures", help="Skip matches.png and checkerboard.png."),
    threads: Optional[int] = ThreadsOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Register SAR to OPTICAL; write result.json, tiepoints.csv, figures and registered_sar.tif."""
    from promptmid.api import Matcher
    from promptmid.registration import prepare_out_dir, write_products

    _set_threads(threads)
    out_dir = prepare_out_dir(out, overwrite)
    overrides = build_overrides(model=model, threshold=threshold, try_rotations=try_rotations,
                                rotation_step=rotation_step, top_k=top_k, max_side=max_side,
                                sar_scale=sar_scale, nan_as_nodata=nan_as_nodata)
    quiet = quiet or json_out
    with status(quiet) as progress:
        progress("loading models")
        matcher = Matcher(preset, overrides)
        opt_img, sar_img = matcher.prepare(optical, "optical"), matcher.prepare(sar, "sar")
        result = matcher.match(opt_img, sar_img, progress=progress)
        progress("writing outputs")
        write_products(out_dir, result, opt_img, sar_img, not no_figures)
    report(result, out_dir, quiet, json_out)


def report(result: Any, out_dir: Path, quiet: bool, json_out: bool) -> None:
    """Print the outcome; exit non-zero (after writing result.json) when the fit failed."""
    if json_out:
        print((out_dir / "result.json").read_text())
    if not result.ok:
        fail(f"registration failed: {result.reason} (see {out_dir / 'result.json'})", 5)
    if quiet:
        return
    table = Table(title=f"promptmid {result.config.get('preset')} -> {out_dir}", show_header=False)
    rows = [
        ("transform (optical px -> SAR px)", "\n".join(" ".join(f"{v:10.4f}" for v in row) for row in result.transform)),
        ("matches / inliers", f"{len(result.points0)} / {result.num_inliers} ({result.num_inliers / max(1, len(result.points0)):.0%})"),
        ("residual RMSE", f"{result.rmse:.2f} SAR px"),
        ("inlier coverage", f"{result.coverage():.0%} of the optical image"),
        ("SAR rotation tried/kept", f"{result.rotation_deg:g} deg"),
        ("time", ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())),
    ]
    for k, v in rows:
        table.add_row(k, v)
    out_console.print(table)


@app.command()
@handle_errors
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

    _set_threads(threads)
    summary = run_demo(out, preset=preset, seed=seed, size=size, overwrite=overwrite, quiet=quiet)
    if not quiet:
        out_console.print(summary["text"])
    if summary["status"] != "ok" or summary["mean_corner_error_px"] > 5.0:
        fail(f"demo did not register within 5 px: {summary.get('reason') or summary['mean_corner_error_px']}", 5)


@app.command()
@handle_errors
def models(
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check each weight file's sha256."),
    json_out: bool = JsonOpt,
) -> None:
    """List every model: source package and version, checksum, cache path, readiness."""
    from promptmid.models.weights import model_status

    rows = model_status(verify)
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
        sys.exit(4)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
