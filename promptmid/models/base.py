"""The interface every dense feature source (DINOv2, diffusion, ...) implements, and the per-pair context.

Sources are stateless between calls: whatever belongs to one optical/SAR pair (the land-use class chosen
on the optical image, the prompts used) lives in a :class:`PairContext` that the caller creates per pair
and passes in. One source object can therefore serve several pairs at once (threads, Dask workers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from promptmid.io import Modality



@dataclass
class PairContext:
    """What the sources decided for one optical/SAR pair; owned by the caller, filled by the sources.

    Attributes:
        land_use: land-use class used for both images (``None``: not chosen / not applicable).
        land_use_scores: classifier score per class (lower = better), when the class was chosen automatically.
        prompts: prompt text used per modality (``{"optical": ..., "sar": ...}``).
    """

    land_use: str | None = None
    land_use_scores: dict[str, float] | None = None
    prompts: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for ``result.json`` (empty when no source used it)."""
        out: dict[str, Any] = {}
        if self.land_use is not None:
            out["land_use_class"] = self.land_use
        if self.land_use_scores:
            out["land_use_scores"] = json.loads(json.dumps({k: round(v, 6) for k, v in self.land_use_scores.items()}))
        if self.prompts:
            out["prompts"] = dict(self.prompts)
        return out


@runtime_checkable
class FeatureSource(Protocol):
    """A backbone that describes keypoints of one image.

    ``describe`` receives the image as a ``[1, 3, H, W]`` float tensor in ``[0, 1]``
    (optical or SAR, already scaled to 3 channels by :mod:`promptmid.io`), keypoints
    ``[N, 2]`` as (x, y) pixels of that image, the image's ``modality`` and the pair's
    :class:`PairContext`, and returns a dict ``name -> [N, C]`` of (not normalised) features,
    one entry per scale/layer, e.g. ``{"dinov2_l4": ..., "dinov2_l8": ...}``.
    ``begin_pair`` lets a source decide per-pair settings on the optical image (into the
    context). ``info`` describes the model for ``result.json`` (name, version, checksum).
    Sources never look at the other image and keep no per-pair state.
    """

    name: str

    def begin_pair(self, optical: torch.Tensor, context: PairContext) -> None: ...

    def describe(self, image: torch.Tensor, keypoints: torch.Tensor, *, modality: Modality,
                 context: PairContext) -> dict[str, torch.Tensor]: ...

    def info(self) -> dict[str, str]: ...
