"""promptmid: optical-SAR image registration with modality-invariant descriptors (PromptMID).

The public names below are imported on first use (PEP 562), so that ``import promptmid`` and the CLI's
``--help`` do not load torch and the models' libraries.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Matcher": "promptmid.api", "MatchResult": "promptmid.api",
    "PRESETS": "promptmid.config", "get_config": "promptmid.config",
    "PromptMIDError": "promptmid.errors", "InputError": "promptmid.errors", "ModelError": "promptmid.errors",
    "MatchingError": "promptmid.errors", "OutputExistsError": "promptmid.errors",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'promptmid' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
