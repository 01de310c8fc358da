"""Choosing the pairs of an evaluation, and the provenance facts (commit, machine) its summaries and the benchmarks
print (:func:`promptmid.evaluation.runner.header_lines`)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from promptmid.evaluation.manifest import Pair


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
