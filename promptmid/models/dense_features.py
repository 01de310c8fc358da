"""Learned dense channels for the global area search (:func:`promptmid.search.global_search`).

ALIKED's dense feature map (the 128-channel map its descriptor head samples, L2-normalised per pixel) localises
structure more distinctively across optical and SAR than gradients alone: on the calibration pairs (training 3MOS
tiles and validation; SAR warped onto the optical grid by the truth, then cropped in a different frame so no
position cue is shared) its correlation peaked within 4 px of the truth on 30 of 35 pairs when stacked onto the
oriented gradients, against 26 of 35 for the gradients alone. It is projected to a few channels with a fixed random
matrix (distances kept on average; the FFT correlation costs one transform per channel) and weighted against the
gradients, which have unit norm per pixel; or (``search.learned = "trained"``, :func:`search_features`) with a
matrix trained for the search (:mod:`promptmid.training.search_head`, shipped as
``weights/promptmid-search-head-v1.json``, sha256 pinned), whose norm sets that weight.

Coordinates: the map covers the whole prepared image (pixel centres at integers); the search resizes it to each
level.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from promptmid.io import image_tensor
from promptmid.models.keypoints import aliked_dense_map, load_aliked_net
from promptmid.models.weights import SEARCH_HEAD, SEARCH_HEAD_SHA256, read_search_head

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
        seed: seed of the fixed random projection (the same for both images of a pair, and for every pair).
        projection: ``[128, C]``, a projection to use instead (e.g. the trained one, :func:`load_search_head`).
        name: what the hypotheses found with these channels are called (``"area+<name>"``).
    """

    def __init__(self, net: torch.nn.Module | None = None, channels: int = 16, weight: float = 0.5,
                 long_side: int = 512, seed: int = 0, projection: torch.Tensor | None = None,
                 name: str = "aliked") -> None:
        self.net = net if net is not None else load_aliked_net()
        self.projection = random_projection(channels, weight, seed) if projection is None else projection.float()
        self.name = name  # the hypotheses it helps find are "area+<name>"
        self.long_side = long_side
        self._known: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()  # remember(): the last REMEMBERED

    @torch.inference_mode()
    def __call__(self, image: PreparedImage) -> np.ndarray:
        x = self._input(image)
        known = self._known.get(_key(x))
        if known is not None:  # the keypoint stage computed this very map already
            return known
        dense, _ = aliked_dense_map(self.net, x)  # [1, 128, h', w'], unit norm per pixel
        return self._project(dense)

    @torch.inference_mode()
    def dense(self, image: PreparedImage) -> torch.Tensor:
        """ALIKED's dense map ``[1, 128, h', w']`` (unit norm per pixel) of ``image`` reduced to ``long_side`` px,
        before the projection (what :mod:`promptmid.training.search_head` trains the projection on)."""
        return aliked_dense_map(self.net, self._input(image))[0]

    def _input(self, image: PreparedImage) -> torch.Tensor:
        """The ``[1, 3, h, w]`` float input ALIKED sees: the image area-reduced to at most ``long_side`` px."""
        x = image_tensor(image)
        h, w = x.shape[-2:]
        f = min(1.0, self.long_side / max(h, w))
        if f < 1.0:
            x = F.interpolate(x, size=(max(round(h * f), 32), max(round(w * f), 32)), mode="area")
        return x

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


def random_projection(channels: int = 16, weight: float = 0.5, seed: int = 0) -> torch.Tensor:
    """The fixed random ``[128, channels]`` projection: distances kept on average, ``weight`` per pixel."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(128, channels, generator=gen) * (weight / channels ** 0.5)


@lru_cache(maxsize=4)
def load_search_head(path: str | None = None) -> torch.Tensor:
    """The trained ``[128, C]`` projection (:mod:`promptmid.training.search_head`): the shipped one (sha256
    verified) or one from ``path`` (a fresh training run).

    Raises:
        ModelError: missing file, checksum mismatch, or not a ``[128, C]`` matrix.
    """
    file, pinned = (Path(path), None) if path else (SEARCH_HEAD, SEARCH_HEAD_SHA256)
    return torch.from_numpy(read_search_head(file, pinned))


CHANNEL_NAMES = {"aliked": "aliked", "trained": "aliked-trained"}  # search.learned kind -> SearchFeatures.name


def search_features(kind: str, net: torch.nn.Module | None = None) -> SearchFeatures:
    """The learned channels named ``kind``: ``"aliked"`` (ALIKED's map, fixed random projection) or ``"trained"``
    (ALIKED's map, the trained projection, :func:`load_search_head`)."""
    if kind == "aliked":
        return SearchFeatures(net)
    if kind == "trained":
        return SearchFeatures(net, projection=load_search_head(), name=CHANNEL_NAMES[kind])
    raise ValueError(f"Unknown learned search channels {kind!r}; valid: aliked, trained")


def _key(x: torch.Tensor) -> tuple[Any, ...]:
    """Identity of an input tensor's pixels: shape, dtype and a digest of its bytes."""
    data = x.detach().cpu().contiguous().numpy()
    return x.shape, str(x.dtype), hashlib.blake2b(data.tobytes(), digest_size=16).digest()
