"""The pick's ranker: a logistic model over a candidate's evidence, trained on the product's candidates of perturbed
training pairs (:mod:`promptmid.training.pick`), shipped as ``weights/promptmid-pick-v1.json`` (sha256 pinned).

Its inputs are :data:`PICK_FEATURES` (computed by :func:`promptmid.selection.pick_features`); its score is the logit
of "this candidate is within 5 px of the truth". An option of the pick (``search.ranker = "trained"``,
:func:`promptmid.selection.ranker_named`); the default is the hand-set :class:`promptmid.selection.HandRule`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from promptmid.errors import ModelError
from promptmid.qc import Logistic, pinned_status, read_pinned_json

# a candidate's inputs, in order (see promptmid.selection.pick_features)
PICK_FEATURES = ("log_confidence", "mi_peak", "confirmed", "confirmed_with_keypoints", "is_keypoints", "failed",
                 "ok", "dense_peak", "dense_distinctness", "refine_inlier_ratio", "dense_offset_px")
PICK_MODEL = Path(__file__).resolve().parent / "weights" / "promptmid-pick-v1.json"
PICK_MODEL_SHA256 = "ee83a0563ebd30561d61e77c9105715ad9ef4334672a2c1f9bc46f3e34aa6497"  # of the file written by python -m promptmid.training.pick


@dataclass(frozen=True)
class PickModel(Logistic):
    """Standardised logistic regression over :data:`PICK_FEATURES`; :meth:`score` gives logits."""

    info: dict[str, Any] = field(default_factory=dict)

    def score(self, x: np.ndarray) -> np.ndarray:
        """Logits ``[n]`` of ``[n, F]`` feature rows."""
        return self.logit(x)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PickModel":
        return cls(**cls.core_of(d), info=dict(d.get("info", {})))


@lru_cache(maxsize=4)
def load_pick_model(path: str | None = None) -> PickModel:
    """The shipped ranker (checksum verified) or one from ``path`` (e.g. a fresh training run).

    Raises:
        ModelError: missing file, checksum mismatch, or features other than :data:`PICK_FEATURES`.
    """
    file = Path(path) if path else PICK_MODEL
    data = read_pinned_json(file, None if path else PICK_MODEL_SHA256, "pick model", "a trained")
    try:
        model = PickModel.from_dict(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"pick model {file} is unreadable: {exc}") from exc
    if model.features != PICK_FEATURES or not model.mean.shape == model.std.shape == model.coef.shape == (
            len(PICK_FEATURES),):
        raise ModelError(f"pick model {file} has features {list(model.features)}; expected {list(PICK_FEATURES)}")
    return model


def pick_model_status() -> list[dict[str, Any]]:
    """``promptmid models`` row for the shipped ranker (loaded and checksum-verified)."""
    load_pick_model.cache_clear()
    return pinned_status(PICK_MODEL, PICK_MODEL_SHA256, "ranker of the pick (logistic; trained on perturbed "
                         "training 3MOS tiles)", load_pick_model)