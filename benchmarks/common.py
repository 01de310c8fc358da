"""Shared pieces of the benchmark scripts: provenance header and markdown tables."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from promptmid.evaluation.pipeline import cpu_name, git_revision


def header_lines(title: str, threads: int | None = None) -> list[str]:
    """Title, date, commit, machine and thread count, as markdown lines."""
    import torch

    return [
        f"# {title}", "",
        f"- date: {datetime.date.today().isoformat()}; promptmid git {git_revision(Path(__file__).parent)}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
        f"{threads or torch.get_num_threads()} torch threads", "",
    ]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
