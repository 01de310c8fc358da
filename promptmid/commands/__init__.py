"""CLI commands beyond match/demo/models, one module each.

Each module in :data:`COMMAND_MODULES` defines ``register(app: typer.Typer) -> None`` that adds its
command(s) with :func:`promptmid.commands.common.add_command` (which attaches the error handling);
shared helpers live in :mod:`promptmid.commands.common`.
"""

from __future__ import annotations

import typer

from promptmid.commands import apply, diffusion, evaluate, scale, train

COMMAND_MODULES = (train, scale, apply, evaluate, diffusion)


def register_all(app: typer.Typer) -> None:
    """Add every command module's commands to ``app``."""
    for module in COMMAND_MODULES:
        module.register(app)
