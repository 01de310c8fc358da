"""``promptmid eval``: run registered methods on ground-truth pair manifests and write the tables."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from promptmid.commands.common import OverwriteOpt, QuietOpt, ThreadsOpt, add_command, err_console, out_console


def _split(text: Optional[str]) -> Optional[list[str]]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def eval_command(
    manifests: List[Path] = typer.Argument(..., help="Pair manifests (JSON lines, README 'Manifest format')."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods (default: all default ones; "
                                          "see `promptmid eval-methods`)."),
    workers: int = typer.Option(1, "--workers", "-w", help="Parallel worker processes (pairs in parallel)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first K pairs (after filtering)."),
    sources: Optional[str] = typer.Option(None, "--sources", help="Comma-separated sources to keep, e.g. srif,3mos."),
    quality: Optional[str] = typer.Option(None, "--gt-quality", help="Comma-separated gt_quality values to keep, "
                                          "e.g. exact,approx (default: all)."),
    rotations: str = typer.Option("0", "--rotations", help="SAR rotations (deg) searched by methods that are not "
                                  "rotation-invariant, e.g. 0,90,180,270."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache of raw matches per (method, pair): makes runs "
                                         "resumable."),
    perturb: Optional[int] = typer.Option(None, "--perturb", help="Displace every SAR image by a random transform "
                                          "seeded with this number (and the pair id) and compose the GT: the protocol "
                                          "for registration. Without it pairs are scored as they are (aligned)."),
    perturb_kind: str = typer.Option("standard", "--perturb-kind", help="standard (rotation +-15 deg, scale "
                                     "0.8-1.25, shear, shift up to 15 %), full-rotation (any angle: pair it with "
                                     "--rotations 0,90,180,270) or shift (pure translation: position-shortcut test)."),
    no_figures: bool = typer.Option(False, "--no-figures", help="Skip the figures."),
    threads: Optional[int] = ThreadsOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Evaluate methods on GT pairs: pairs.csv, summary.md, summary.json, figures in OUT."""
    from rich.progress import Progress

    from promptmid.evaluation.manifest import read_manifests
    from promptmid.evaluation.methods import parse_methods
    from promptmid.evaluation.perturb import Perturbation
    from promptmid.evaluation.pipeline import select_pairs
    from promptmid.evaluation.runner import EvalConfig, run_and_report
    from promptmid.outputs import prepare_out_dir

    names = parse_methods(methods)
    pairs = select_pairs(read_manifests(manifests), _split(sources), _split(quality), limit)
    angles = [float(a) for a in _split(rotations) or ["0"]]
    out_dir = prepare_out_dir(out, overwrite)
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    displacement = None if perturb is None else Perturbation(perturb, perturb_kind)
    conf = EvalConfig(names, angles, cache_dir=str(cache) if cache else None, threads=threads, perturb=displacement)
    with Progress(console=err_console, disable=quiet, transient=True) as bar:
        task = bar.add_task(f"{len(pairs)} pairs x {len(names)} methods", total=len(pairs))
        run_and_report(pairs, conf, out_dir, workers, not no_figures, progress=lambda _p: bar.advance(task))
    if not quiet:
        out_console.print(f"wrote {out_dir / 'summary.md'}, pairs.csv, summary.json"
                          f"{'' if no_figures else ', mma.png, corner_cdf.png, checkerboards.png'}")


def list_methods() -> None:
    from promptmid.evaluation.methods import METHODS

    for spec in METHODS.values():
        flag = "" if spec.default else " (not in the default set)"
        out_console.print(f"{spec.name}: {spec.description}{flag}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``promptmid eval`` and ``promptmid eval-methods``."""
    add_command(app, "eval", eval_command)
    add_command(app, "eval-methods", list_methods, help="List the methods that `promptmid eval` can run.")
