"""CLI commands beyond match/demo/models, one module each.

Each module listed in ``COMMAND_MODULES`` defines ``register(app: typer.Typer) -> None``
that adds its command(s) to the app; shared helpers live in :mod:`promptmid.commands.common`.
"""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES: list[str] = [
    "train",
    "scale",
    "evaluate",
    "diffusion",
]


def register_all(app: typer.Typer) -> None:
    """Add every command module's commands to ``app``."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"promptmid.commands.{name}").register(app)
