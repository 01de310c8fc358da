"""Learned dense channels for the global area search (:func:`promptmid.search.global_search`).

ALIKED's dense feature map (the 128-channel map its descriptor head samples, L2-normalised per pixel) localises
structure more distinctively across optical and SAR than gradients alone: on the calibration pairs (training 3MOS
tiles and validation; SAR warped onto the optical grid by the truth, then cropped in a different frame so no
position cue is shared) its correlation peaked within 4 px of the truth on 30 of 35 pairs when stacked onto the
oriented gradients, against 26 of 35 for the gradients alone. It is projected to a few channels with a fixed random
matrix (distances kept on average; the FFT correlation costs one transform per channel) and weighted against the
gradients, which have unit norm per pixel.

Coordinates: the map covers the whole prepared image (pixel centres at integers); the search resizes it to each
level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from promptmid.models.keypoints import aliked_dense_map, load_aliked_net

if TYPE_CHECKING:
    from promptmid.io import PreparedImage


class SearchFeatures:
    """Callable ``PreparedImage -> [h, w, channels]`` float32: ALIKED's dense map of the image reduced to
    ``long_side`` px, projected to ``channels`` and scaled by ``weight`` (per pixel, the expected norm).

    Args:
        net: a loaded ALIKED network (e.g. the keypoint stage's); ``None`` loads ALIKED-n16.
        channels: projected channels (each costs one FFT per searched cell).
        weight: expected norm per pixel relative to the oriented gradients (1 per pixel).
        long_side: size (px) ALIKED sees: twice the search's fine level (the map is area-reduced to it).
        seed: seed of the fixed projection (the same for both images of a pair, and for every pair).
    """

    name = "aliked"  # the hypotheses it helps find are "area+aliked"

    def __init__(self, net: torch.nn.Module | None = None, channels: int = 16, weight: float = 0.5,
                 long_side: int = 512, seed: int = 0) -> None:
        self.net = net if net is not None else load_aliked_net()
        gen = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(128, channels, generator=gen) * (weight / channels ** 0.5)
        self.long_side = long_side

    @torch.inference_mode()
    def __call__(self, image: PreparedImage) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(image.image.transpose(2, 0, 1)))[None].float()
        h, w = x.shape[-2:]
        f = min(1.0, self.long_side / max(h, w))
        if f < 1.0:
            x = F.interpolate(x, size=(max(round(h * f), 32), max(round(w * f), 32)), mode="area")
        dense, _ = aliked_dense_map(self.net, x)  # [1, 128, h', w'], unit norm per pixel
        out = torch.einsum("chw,ck->hwk", dense[0].float(), self.projection.to(dense.device))
        return np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
