"""promptmid: optical-SAR image registration with modality-invariant descriptors (PromptMID)."""

__version__ = "0.1.0"

from promptmid.api import Matcher, MatchResult  # noqa: E402
from promptmid.config import PRESETS, get_config  # noqa: E402
from promptmid.errors import InputError, MatchingError, ModelError, OutputExistsError, PromptMIDError  # noqa: E402

__all__ = [
    "Matcher", "MatchResult", "PRESETS", "get_config",
    "PromptMIDError", "InputError", "ModelError", "MatchingError", "OutputExistsError",
]
