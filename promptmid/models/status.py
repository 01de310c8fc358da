"""What ``promptmid models`` lists: every model promptmid uses, where it comes from, its checksum and whether it is
ready.

Each row is a dict with ``name``, ``source``, ``sha256`` (first 16 hex digits of the pinned checksum), ``licence``,
``cache_path``, ``ready`` and ``message``. Nothing here imports torch, so the listing answers in well under a second:
the files this package ships (trained aggregators, PromptDM-small, the QC, pick and search-head models) are checked
against the sha256 pinned in code (:mod:`promptmid.models.weights`); a file with the pinned checksum is the released
file, keys and all. Loading a model checks the same pins again, and its keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from promptmid.errors import ModelError
from promptmid.models.weights import (
    AGGREGATOR_FILES,
    AGGREGATOR_SHA256,
    PROMPTDM_FILE,
    PROMPTDM_SHA256,
    SEARCH_HEAD,
    SEARCH_HEAD_SHA256,
    WEIGHTS_DIR,
    model_status,
    read_search_head,
    sha256_file,
)

__all__ = ["all_models", "shipped_file_row"]


def all_models(verify: bool = True) -> list[dict[str, Any]]:
    """Every row of ``promptmid models``: the packaged upstream weights, the DINOv2 feature graph, the shipped
    aggregators, PromptDM-small, and the QC, pick and search-head models. ``verify``: check the sha256 of the
    large files (about 220 MB read); the small shipped JSON models are always checked."""
    from promptmid.models.dinov2_onnx import graph_status
    from promptmid.qc import pinned_status, qc_model_status
    from promptmid.ranker import pick_model_status

    aggregators = [row for name, filename in AGGREGATOR_FILES.items()
                   for row in shipped_file_row(WEIGHTS_DIR / filename, AGGREGATOR_SHA256[name], verify,
                                               "trained feature aggregator (see promptmid/weights/MODEL_CARD.md)")]
    promptdm = shipped_file_row(PROMPTDM_FILE, PROMPTDM_SHA256, verify,
                                "prompt-conditioned pixel-space diffusion UNet trained here "
                                "(promptmid/weights/PROMPTDM_CARD.md); text encoder: minilm_l6")
    search_head = pinned_status(SEARCH_HEAD, SEARCH_HEAD_SHA256, "projection of ALIKED's dense map for the area "
                                "search (search.learned = both-trained, the default, or trained)",
                                lambda: read_search_head(SEARCH_HEAD, SEARCH_HEAD_SHA256))
    return (model_status(verify) + [graph_status(verify)] + aggregators + promptdm + qc_model_status()
            + pick_model_status() + search_head)


def shipped_file_row(file: Path, sha256: str, verify: bool, message: str) -> list[dict[str, Any]]:
    """The row of a weights file this package ships (:func:`promptmid.qc.pinned_status`, named after the file):
    present, and (when ``verify``) with the pinned ``sha256``."""
    from promptmid.qc import pinned_status

    def check() -> None:
        if not file.is_file():
            raise ModelError(f"missing {file}; reinstall promptmid")
        if verify and sha256_file(file) != sha256:
            raise ModelError(f"sha256 of {file} differs from the released weights; reinstall promptmid")

    return pinned_status(file, sha256, message, check)
