"""The interface every dense feature source (DINOv2, diffusion, ...) implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class FeatureSource(Protocol):
    """A backbone that describes keypoints of one image.

    ``describe`` receives the image as a ``[1, 3, H, W]`` float tensor in ``[0, 1]``
    (optical or SAR, already scaled to 3 channels by :mod:`promptmid.io`) and keypoints
    ``[N, 2]`` as (x, y) pixels of that image, and returns a dict ``name -> [N, C]``
    of (not normalised) features, one entry per scale/layer, e.g.
    ``{"dinov2_l4": ..., "dinov2_l8": ...}``. ``info`` describes the model for
    ``result.json`` (name, version, checksum). Sources never look at the other image.
    """

    name: str

    def describe(self, image: torch.Tensor, keypoints: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def info(self) -> dict[str, str]: ...
