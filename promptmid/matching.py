"""Descriptor matching and robust geometry.

Coordinates: point arrays are ``[N, 2]`` (x, y) pixels; ``points0`` are in image 0
(optical), ``points1`` in image 1 (SAR). A fitted ``matrix`` is 3x3 and maps image-0
pixels to image-1 pixels: ``[x1, y1, 1]^T ~ M [x0, y0, 1]^T``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeVar

import cv2
import numpy as np

from promptmid.config import DEFAULTS, INLIER_THRESHOLD_PX
from promptmid.geometry import apply_transform, residuals

if TYPE_CHECKING:  # the fitting is numpy/OpenCV; torch is imported by the descriptor matching that needs it
    import torch

GEOMETRY_MODELS = ("affine", "homography", "similarity")
MIN_SAMPLES = {"affine": 3, "homography": 4, "similarity": 2}


def mutual_nearest_neighbours(
    desc0: torch.Tensor, desc1: torch.Tensor, ratio: float | None = None, min_similarity: float = -1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours on cosine similarity.

    Args:
        desc0: ``[N0, D]`` L2-normalised descriptors of image 0.
        desc1: ``[N1, D]`` L2-normalised descriptors of image 1.
        ratio: optional Lowe ratio on distances (keep if d1/d2 < ratio).
        min_similarity: drop matches whose cosine similarity is below this.

    Returns:
        ``matches [K, 2]`` int indices (i0, i1) and ``scores [K]`` cosine similarities.
    """
    if len(desc0) == 0 or len(desc1) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    return mutual_nn_from_similarity(desc0.float() @ desc1.float().t(), ratio, min_similarity)


def mutual_nn_from_similarity(
    sim: torch.Tensor, ratio: float | None = None, min_similarity: float = -1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours of a ``[N0, N1]`` cosine-similarity matrix (``-inf`` = forbidden).

    See :func:`mutual_nearest_neighbours` for the arguments and outputs.
    """
    import torch

    idx0 = torch.arange(sim.shape[0])
    best01 = sim.argmax(dim=1)
    best10 = sim.argmax(dim=0)
    keep = best10[best01] == idx0
    scores = sim[idx0, best01]
    keep &= (scores >= min_similarity) & torch.isfinite(scores)
    if ratio is not None and sim.shape[1] >= 2:
        top2 = sim.topk(2, dim=1).values
        dist = torch.sqrt(torch.clamp(2 - 2 * top2, min=0))
        keep &= dist[:, 0] < ratio * dist[:, 1]
    matches = torch.stack([idx0[keep], best01[keep]], dim=-1)
    return matches.numpy().astype(np.int64), scores[keep].numpy().astype(np.float32)


@dataclass
class Geometry:
    """Result of a robust fit.

    Attributes:
        matrix: 3x3 image-0 -> image-1 transform, or ``None`` when the fit failed.
        inliers: ``[K]`` bool mask over the input correspondences.
        rmse: residual RMSE (px, image 1) over inliers.
        model: geometry model name.
        reason: why the fit failed (empty when it succeeded).
    """

    matrix: np.ndarray | None
    inliers: np.ndarray
    rmse: float = float("nan")
    model: str = "affine"
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.matrix is not None

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())





def fit_geometry(
    points0: np.ndarray,
    points1: np.ndarray,
    model: str = "affine",
    threshold: float = INLIER_THRESHOLD_PX,
    min_inliers: int = 6,
    confidence: float = 0.9999,
    max_iters: int = 10000,
) -> Geometry:
    """Robustly fit an image-0 -> image-1 transform with OpenCV USAC/MAGSAC.

    Args:
        points0, points1: ``[K, 2]`` corresponding (x, y) pixels.
        model: ``"affine"``, ``"homography"`` or ``"similarity"`` (rotation+scale+shift).
        threshold: inlier threshold in image-1 pixels.
        min_inliers: fewer inliers than this counts as a failed fit.

    Returns:
        :class:`Geometry`; ``matrix`` is ``None`` (never invented) when the fit fails.
    """
    if model not in GEOMETRY_MODELS:
        raise ValueError(f"Unknown geometry model {model!r}; valid: {', '.join(GEOMETRY_MODELS)}")
    p0 = np.asarray(points0, np.float64).reshape(-1, 2)
    p1 = np.asarray(points1, np.float64).reshape(-1, 2)
    need = max(MIN_SAMPLES[model], min_inliers)
    empty = np.zeros(len(p0), bool)
    if len(p0) < need:
        return Geometry(None, empty, model=model, reason=f"only {len(p0)} matches; {model} needs at least {need}")
    matrix, mask = _robust_fit(p0, p1, model, threshold, confidence, max_iters)
    if matrix is None or mask is None or not np.isfinite(matrix).all():
        return Geometry(None, empty, model=model, reason=f"robust {model} fit found no consensus")
    inliers = mask.ravel().astype(bool)
    if inliers.sum() < need:
        reason = f"only {int(inliers.sum())} inliers; need at least {need}"
        return Geometry(None, inliers, model=model, reason=reason)
    rmse = float(np.sqrt(np.mean(residuals(matrix, p0[inliers], p1[inliers]) ** 2)))
    return Geometry(matrix, inliers, rmse, model)


def _robust_fit(
    p0: np.ndarray, p1: np.ndarray, model: str, threshold: float, confidence: float, max_iters: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    a, b = p0.astype(np.float32), p1.astype(np.float32)
    if model == "homography":
        return cv2.findHomography(a, b, cv2.USAC_MAGSAC, threshold, maxIters=max_iters, confidence=confidence)
    if model == "affine":
        m, mask = cv2.estimateAffine2D(a, b, method=cv2.USAC_MAGSAC, ransacReprojThreshold=threshold,
                                       maxIters=max_iters, confidence=confidence, refineIters=10)
    else:  # OpenCV's similarity fit takes RANSAC or LMedS only (USAC methods raise)
        m, mask = cv2.estimateAffinePartial2D(a, b, method=cv2.RANSAC, ransacReprojThreshold=threshold,
                                              maxIters=max_iters, confidence=confidence, refineIters=10)
    return (None, None) if m is None else (np.vstack([m, [0.0, 0.0, 1.0]]), mask)


def guided_matches(
    desc0: torch.Tensor, desc1: torch.Tensor, kpts0: np.ndarray, kpts1: np.ndarray, matrix: np.ndarray,
    radius: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours restricted to pairs that agree with a transform.

    Args:
        desc0, desc1: ``[N0, D]``, ``[N1, D]`` L2-normalised descriptors.
        kpts0, kpts1: ``[N0, 2]``, ``[N1, 2]`` keypoints (x, y px) in the frames ``matrix`` relates.
        matrix: 3x3 image-0 -> image-1 transform (e.g. a first robust fit).
        radius: a pair is allowed when ``|matrix(k0) - k1| <= radius`` (image-1 px).

    Returns:
        ``matches [K, 2]`` and ``scores [K]`` as :func:`mutual_nearest_neighbours`.
    """
    if len(desc0) == 0 or len(desc1) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    import torch

    pred = torch.from_numpy(apply_transform(matrix, kpts0)).float()
    dist = torch.cdist(pred, torch.as_tensor(kpts1, dtype=torch.float32))
    sim = (desc0.float() @ desc1.float().t()).masked_fill(dist > radius, float("-inf"))
    return mutual_nn_from_similarity(sim)


@dataclass
class Candidate:
    """Matches and robust fit of one image pair (one rotation step of the SAR image).

    Attributes:
        geometry: the fit (``geometry.inliers`` indexes ``matches``).
        matches: ``[K, 2]`` indices (i0, i1) into the keypoints given to :func:`match_and_fit`.
        scores: ``[K]`` cosine similarities of the matches.
        timings: seconds spent in ``"matching"`` and ``"fitting"``.
    """

    geometry: Geometry
    matches: np.ndarray
    scores: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_inliers(self) -> int:
        return self.geometry.num_inliers


def match_and_fit(desc0: torch.Tensor, desc1: torch.Tensor, kpts0: np.ndarray, kpts1: np.ndarray,
                  matching: Mapping[str, Any], geometry: Mapping[str, Any]) -> Candidate:
    """The matching core shared by the Matcher, evaluation and training validation.

    Mutual nearest neighbours (``matching["ratio"]``, ``["min_similarity"]``) -> robust fit
    (``geometry["model"]``, ``["threshold"]``, ``["min_inliers"]``) -> up to
    ``matching["guided_iterations"]`` rounds of guided re-matching within ``["guided_radius"]`` px of
    the fit and refit, each kept only when it has at least as many inliers. Keys left out take the defaults of
    :data:`promptmid.config.DEFAULTS` (the same everywhere: Matcher, evaluation, training validation).

    Args:
        desc0, desc1: ``[N0, D]``, ``[N1, D]`` L2-normalised descriptors.
        kpts0, kpts1: ``[N0, 2]``, ``[N1, 2]`` keypoints (x, y px) in the frames the fit relates
            (image 0 -> image 1; the Matcher passes original optical and SAR pixels).
    """
    matching = {**DEFAULTS["matching"], **matching}  # a missing key takes the config default, everywhere
    geometry = {**DEFAULTS["geometry"], **geometry}
    timings = {"matching": 0.0, "fitting": 0.0}
    fit_args = (geometry["model"], geometry["threshold"], geometry["min_inliers"])

    def timed(key: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        timings[key] += time.perf_counter() - t0
        return out

    matches, scores = timed("matching", mutual_nearest_neighbours, desc0, desc1, matching["ratio"],
                            matching["min_similarity"])
    geom = timed("fitting", fit_geometry, kpts0[matches[:, 0]], kpts1[matches[:, 1]], *fit_args)
    for _ in range(int(matching["guided_iterations"]) if geom.ok else 0):
        gm, gs = timed("matching", guided_matches, desc0, desc1, kpts0, kpts1, geom.matrix,
                       matching["guided_radius"])
        refit = timed("fitting", fit_geometry, kpts0[gm[:, 0]], kpts1[gm[:, 1]], *fit_args)
        if not refit.ok or refit.num_inliers < geom.num_inliers:
            break
        matches, scores, geom = gm, gs, refit
    return Candidate(geom, matches, scores, timings)


Trial = TypeVar("Trial")


def search_rotations(angles: Iterable[float], match_at: Callable[[float], Trial],
                     inliers: Callable[[Trial], int]) -> tuple[float, Trial, dict[str, int]]:
    """The rotation search every matcher shares (:class:`promptmid.api.Matcher`, training validation, the evaluation
    of keypoint peers): match the pair at each angle (degrees, the SAR turned counter-clockwise by
    :func:`promptmid.io.rotate_prepared`) and keep the first angle with the most inliers.

    Args:
        angles: the angles to try, in order (at least one).
        match_at: the match at one angle (any result type).
        inliers: its number of inliers.

    Returns:
        ``(best angle, its result, {"angle": inliers})`` (angles formatted with ``:g``).
    """
    best: tuple[float, Trial] | None = None
    best_inliers = -1
    scores: dict[str, int] = {}
    for angle in angles:
        trial = match_at(float(angle))
        n = scores[f"{angle:g}"] = int(inliers(trial))
        if n > best_inliers:
            best, best_inliers = (float(angle), trial), n
    if best is None:
        raise ValueError("search_rotations needs at least one angle")
    return best[0], best[1], scores
