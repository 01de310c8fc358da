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

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

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
        self._known: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()  # remember(): the last REMEMBERED

    @torch.inference_mode()
    def __call__(self, image: PreparedImage) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(image.image.transpose(2, 0, 1)))[None].float()
        h, w = x.shape[-2:]
        f = min(1.0, self.long_side / max(h, w))
        if f < 1.0:
            x = F.interpolate(x, size=(max(round(h * f), 32), max(round(w * f), 32)), mode="area")
        else:
            known = self._known.get(_key(x))
            if known is not None:  # the keypoint stage computed this very map already
                return known
        dense, _ = aliked_dense_map(self.net, x)  # [1, 128, h', w'], unit norm per pixel
        return self._project(dense)

    @torch.inference_mode()
    def remember(self, image: torch.Tensor, dense: torch.Tensor) -> None:
        """Keep the channels of ``dense``, ALIKED's dense map of the ``[1, 3, H, W]`` input ``image`` computed
        elsewhere (the keypoint stage: :func:`promptmid.models.keypoints.aliked_features`' ``tap``), so that calling
        this on an image with exactly the same pixels returns them without running ALIKED again (the same values:
        the same input through the same network). Only images the search takes at their own size are kept, the
        last :data:`REMEMBERED` of them (an optical/SAR pair)."""
        if max(image.shape[-2:]) > self.long_side:
            return
        self._known[_key(image)] = self._project(dense)
        while len(self._known) > REMEMBERED:
            self._known.popitem(last=False)

    def _project(self, dense: torch.Tensor) -> np.ndarray:
        out = torch.einsum("chw,ck->hwk", dense[0].float(), self.projection.to(dense.device))
        out = np.ascontiguousarray(out.cpu().numpy(), dtype=np.float32)
        out.setflags(write=False)  # shared between calls
        return out


REMEMBERED = 2  # dense maps SearchFeatures.remember keeps


def _key(x: torch.Tensor) -> tuple[Any, ...]:
    """Identity of an input tensor's pixels: shape, dtype and a digest of its bytes."""
    data = x.detach().cpu().contiguous().numpy()
    return x.shape, str(x.dtype), hashlib.blake2b(data.tobytes(), digest_size=16).digest()
