"""Training checkpoints read back safely: tensors and plain containers only, foreign files refused clearly."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from promptmid.errors import InputError


def load_state(path: str | Path, required: Sequence[str]) -> dict[str, Any]:
    """Load a training state written by promptmid (``torch.save`` of tensors and plain containers).

    Loaded with ``weights_only=True``: no pickled code ever runs. A file that is not such a state (another
    program's checkpoint, a pickled object, a truncated or corrupt file) or lacks a ``required`` key is refused.

    Raises:
        InputError: naming the file and what is wrong with it (exit 2).
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, AttributeError) as exc:
        # PyTorch's own message suggests weights_only=False; never pass that on: it would run the file's code
        kind = "holds objects other than tensors" if isinstance(exc, pickle.UnpicklingError) else "cannot be read"
        raise InputError(f"{path} is not a promptmid checkpoint (it {kind}); remove it or choose another "
                         "--out to start afresh.") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise InputError(f"{path} is not a promptmid checkpoint (missing {', '.join(missing)}).")
    return state


def load_module_state(module: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """``module.load_state_dict(state)`` (strict); a state of another architecture is refused (exit 2)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise InputError(f"{path} does not fit this model ({first}); it was written with other settings.") from None
