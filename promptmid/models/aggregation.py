"""Fusing per-keypoint features of several sources into one descriptor.

An aggregator takes the dict of per-source keypoint features of ONE image
(``{"xfeat": [N, 64], "dinov2_l4": [N, 384], ...}``), the keypoints ``[N, 2]`` (x, y px)
and the image size ``(H, W)``, and returns ``[N, D]`` L2-normalised descriptors.
Aggregators never see the other image, so descriptors can be cached and indexed.

:class:`ConcatFusion` is the training-free fusion: each source is L2-normalised,
weighted and concatenated, then the result is L2-normalised again.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F


class Aggregator(Protocol):
    """Anything that turns per-source keypoint features into descriptors."""

    name: str

    def __call__(
        self, features: dict[str, torch.Tensor], keypoints: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor: ...


class ConcatFusion:
    """Training-free fusion by weighted concatenation of L2-normalised sources.

    Args:
        weights: weight per source *group*: a feature key belongs to the group named by
            its prefix before ``_`` (``"dinov2_l8"`` -> ``"dinov2"``). Keys of a group
            share its weight equally in norm (each gets ``w / sqrt(n_keys)``), so a
            group's total contribution does not grow with its number of layers.
            Groups absent from ``weights`` get weight 1.
    """

    name = "concat"

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = dict(weights or {})

    def __call__(
        self, features: dict[str, torch.Tensor], keypoints: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        groups: dict[str, list[str]] = {}
        for key in sorted(features):
            groups.setdefault(key.split("_")[0], []).append(key)
        parts = []
        for group, keys in groups.items():
            w = self.weights.get(group, 1.0) / math.sqrt(len(keys))
            if w == 0:
                continue
            parts += [w * F.normalize(features[k].float(), dim=-1) for k in keys]
        return F.normalize(torch.cat(parts, dim=-1), dim=-1)
