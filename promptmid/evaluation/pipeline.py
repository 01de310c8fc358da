"""Choosing the pairs of an evaluation and the provenance lines (date, commit, machine, protocol) on top of every
summary; :func:`promptmid.evaluation.runner.run_and_report` runs it."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from promptmid.evaluation.manifest import Pair
from promptmid.evaluation.split import SPLIT_TEXT

if TYPE_CHECKING:
    from promptmid.evaluation.runner import EvalConfig


def select_pairs(pairs: list[Pair], sources: list[str] | None = None, qualities: list[str] | None = None,
                 limit: int | None = None) -> list[Pair]:
    """Keep pairs of the given sources and ``gt_quality`` values (``None`` = all), then the first ``limit``."""
    out = [p for p in pairs if (not sources or p.source in sources) and (not qualities or p.gt_quality in qualities)]
    if not out:
        raise ValueError(f"No pair left after filtering (sources={sources}, gt_quality={qualities}).")
    return out[:limit] if limit else out


def git_revision(cwd: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=cwd, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
        return f"{model} ({platform.machine()})" if model else platform.processor() or platform.machine()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()


def header_lines(title: str, conf: EvalConfig, pairs: list[Pair], workers: int) -> list[str]:
    """Provenance lines on top of every summary."""
    import os

    import torch

    rot = ", ".join(f"{a:g}" for a in conf.rotations)
    return [
        f"# {title}", "",
        f"- date: {datetime.date.today().isoformat()}; promptmid git {git_revision(Path(__file__).parent)}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
        f"{conf.threads or torch.get_num_threads()} threads per process, {workers} worker process(es)",
        f"- pairs: {len(pairs)} from sources {', '.join(sorted({p.source for p in pairs}))}",
        f"- {SPLIT_TEXT}",
        f"- geometry: {', '.join(conf.models)} fits (OpenCV USAC MAGSAC, threshold {conf.threshold:g} SAR px, "
        f"min {conf.min_inliers} inliers); images at long side <= {conf.max_side} px; "
        f"rotation search [{rot}] deg for methods that are not rotation-invariant (sift-ratio, rift are).",
        f"- protocol: {'aligned (pairs as they are; says nothing about displaced pairs)' if conf.perturb is None else conf.perturb.describe()}",
    ]
