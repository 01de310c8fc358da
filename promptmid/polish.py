"""Dense affine polish of a transform hypothesis: Gauss-Newton on oriented-gradient features, coarse to fine.

The global area search (:mod:`promptmid.search`) finds a similarity (rotation, scale, shift) on a 256 px grid;
a displaced SAR image is an affine (shear, anisotropic scale) away from the optical one, and the refinement blocks
of :mod:`promptmid.refine` often find too few textured, consistent blocks on 10 m SAR tiles to correct it. This
stage aligns the whole images instead: it maximises the correlation of the oriented-gradient channels
(:func:`promptmid.dense.oriented_gradient_features`, standardised per channel over the valid overlap) over the six
affine parameters of a correction, by damped Gauss-Newton (Lucas-Kanade, forward additive) on a pyramid
(``levels`` long sides, coarse first), re-warping the SAR each iteration. Nodata and the footprint edge are
masked (eroded by ``margin`` px); outside the SAR the warp reflects, so the image border makes no edge.

Coordinates: (x, y) pixels, pixel centres at integers; ``matrix`` maps ORIGINAL optical pixels to ORIGINAL SAR
pixels, like every transform in promptmid; the correction acts on optical pixels (SAR = matrix @ correction @ p).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from promptmid.geometry import original_transform, working_transform
from promptmid.dense import oriented_gradient_features

if TYPE_CHECKING:
    from promptmid.io import PreparedImage

LEVELS = (128, 256)  # long sides (px) of the pyramid, each capped at the working size (512 cost 4 s, for 1 px)
MIN_OVERLAP = 0.1  # least share of the optical level that must stay valid under the warp


@dataclass
class Polish:
    """Outcome of :func:`polish_affine`.

    Attributes:
        matrix: the polished 3x3 optical -> SAR transform (original pixels; the input when nothing improved).
        correlation: mean per-channel correlation of the features at ``matrix`` on the finest level (-1..1).
        start_correlation: the same at the input transform.
        iterations: Gauss-Newton steps taken over all levels.
    """

    matrix: np.ndarray
    correlation: float
    start_correlation: float
    iterations: int


def _level(gray: np.ndarray, valid: np.ndarray, long_side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(gray, valid, S)`` reduced to ``long_side`` (never enlarged); ``S`` maps working px to level px."""
    h, w = gray.shape
    s = min(1.0, long_side / max(h, w))
    size = (max(8, round(w * s)), max(8, round(h * s)))
    g = cv2.resize(gray.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    v = cv2.resize(valid.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return g, v, np.diag([size[0] / w, size[1] / h, 1.0])


def _gradients(feat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(d/dx, d/dy)`` of each channel of ``feat`` [C, h, w], as :func:`numpy.gradient` computes them (central
    differences inside, one-sided at the borders; px units), with OpenCV's filter."""
    kernel = np.array([[-0.5, 0.0, 0.5]], np.float32)
    gx = np.stack([cv2.filter2D(c, -1, kernel) for c in feat])
    gy = np.stack([cv2.filter2D(c, -1, kernel.T) for c in feat])
    gx[:, :, 0], gx[:, :, -1] = feat[:, :, 1] - feat[:, :, 0], feat[:, :, -1] - feat[:, :, -2]
    gy[:, 0], gy[:, -1] = feat[:, 1] - feat[:, 0], feat[:, -1] - feat[:, -2]
    return gx, gy


def _standardised(feat: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, deviation)``: each channel of ``feat`` [C, h, w] over ``mask``, as ``[C, N]`` values of zero mean and
    unit deviation, and the ``[C, 1]`` deviations they were divided by."""
    vals = feat[:, mask]
    vals -= vals.mean(1, keepdims=True)
    deviation = np.sqrt(np.einsum("cn,cn->c", vals, vals) / max(vals.shape[1], 1))[:, None] + 1e-6
    vals /= deviation
    return vals, deviation


@dataclass
class Sample:
    """The features at one transform: ``a``, ``b`` the standardised optical and warped SAR values over ``mask``
    ([C, N]), ``feat1`` the warped SAR features ([C, h, w], not standardised) and ``deviation`` ([C, 1]) what ``b``
    was divided by."""

    a: np.ndarray
    b: np.ndarray
    feat1: np.ndarray
    deviation: np.ndarray
    mask: np.ndarray


class _Aligner:
    """One pyramid level: the optical features fixed, the SAR re-warped for each step."""

    def __init__(self, gray0: np.ndarray, valid0: np.ndarray, gray1: np.ndarray, valid1: np.ndarray,
                 margin: int) -> None:
        self.h, self.w = gray0.shape
        self.feat0 = oriented_gradient_features(gray0)
        self.kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
        self.mask0 = cv2.erode(valid0.astype(np.uint8), self.kernel).astype(bool)
        self.gray1, self.valid1 = gray1, valid1.astype(np.uint8)
        self._last: tuple[np.ndarray, np.ndarray] | None = None  # (mask, optical values) of the last overlap
        self.half = max(self.h, self.w) / 2.0  # coordinates normalised to about [-1, 1] for a well-posed system
        self.norm = np.array([[1 / self.half, 0, -(self.w - 1) / 2 / self.half],
                              [0, 1 / self.half, -(self.h - 1) / 2 / self.half], [0, 0, 1.0]])
        self.corners = np.array([[0, 0, 1], [self.w - 1, 0, 1], [0, self.h - 1, 1], [self.w - 1, self.h - 1, 1.0]])
        yy, xx = np.mgrid[0:self.h, 0:self.w]
        self.xn = (xx - (self.w - 1) / 2) / self.half
        self.yn = (yy - (self.h - 1) / 2) / self.half

    def _optical(self, mask: np.ndarray) -> np.ndarray:
        """The standardised optical values over ``mask`` (kept while the overlap stays the same)."""
        if self._last is None or not np.array_equal(self._last[0], mask):
            self._last = mask, _standardised(self.feat0, mask)[0]
        return self._last[1]

    def evaluate(self, matrix: np.ndarray) -> tuple[float, Sample] | None:
        """``(correlation, sample)`` at ``matrix`` (level px): the mean per-channel correlation of the standardised
        features over the overlap, and what :meth:`step` needs; ``None`` when too little overlap is left."""
        size, inverse = (self.w, self.h), cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        warped = cv2.warpPerspective(self.gray1, matrix, size, flags=inverse, borderMode=cv2.BORDER_REFLECT)
        wvalid = cv2.warpPerspective(self.valid1, matrix, size, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
        mask = self.mask0 & cv2.erode(wvalid, self.kernel).astype(bool)
        if mask.sum() < MIN_OVERLAP * self.h * self.w:
            return None
        a = self._optical(mask)
        feat1 = oriented_gradient_features(warped)
        b, deviation = _standardised(feat1, mask)
        return float((a * b).mean()), Sample(a, b, feat1, deviation, mask)

    def step(self, sample: Sample, damping: float) -> np.ndarray:
        """The damped Gauss-Newton correction (3x3, level px) that moves the warped SAR features onto the optical
        ones. The normal equations are summed over the channels per pixel first: with ``w = (x, y, 1)`` (normalised
        coordinates) the Hessian's blocks are ``sum w w^T gx gx``, ``sum w w^T gx gy`` and ``sum w w^T gy gy``."""
        mask = sample.mask
        gx, gy = _gradients(sample.feat1)
        scale = self.half / sample.deviation  # per normalised unit, of the standardised channels
        gx, gy = gx[:, mask] * scale, gy[:, mask] * scale
        error = sample.a - sample.b
        w = np.stack([self.xn[mask], self.yn[mask], np.ones(int(mask.sum()))], 1)
        sums = [np.einsum("cn,cn->n", p, q) for p, q in ((gx, gx), (gx, gy), (gy, gy), (gx, error), (gy, error))]
        xx, xy, yy = ((w * s[:, None]).T @ w for s in sums[:3])
        hessian = np.block([[xx, xy], [xy.T, yy]])
        rhs = np.concatenate([w.T @ sums[3], w.T @ sums[4]])
        dp = np.linalg.solve(hessian + damping * np.diag(np.diag(hessian)) + 1e-9 * np.eye(6), rhs)
        step = np.array([[1 + dp[0], dp[1], dp[2]], [dp[3], 1 + dp[4], dp[5]], [0, 0, 1.0]])
        return np.linalg.inv(self.norm) @ step @ self.norm


def _align_level(aligner: _Aligner, matrix: np.ndarray, iterations: int, tol_px: float = 0.02
                 ) -> tuple[np.ndarray, float, int]:
    """Gauss-Newton steps while the correlation improves (the damping grows after a step that made it worse)."""
    first = aligner.evaluate(matrix)
    if first is None:
        return matrix, float("nan"), 0
    best, (score, sample), damping, steps = matrix, first, 1e-3, 0
    for steps in range(1, iterations + 1):
        correction = aligner.step(sample, damping)
        trial = best @ correction
        out = aligner.evaluate(trial)
        if out is not None and out[0] > score:
            best, (score, sample), damping = trial, out, max(damping / 10, 1e-6)
            if np.abs(aligner.corners @ (correction - np.eye(3)).T)[:, :2].max() < tol_px:
                break
        else:
            damping *= 10
            if damping > 1e3:
                break
    return best, score, steps


def polish_affine(optical: PreparedImage, sar: PreparedImage, matrix: np.ndarray, levels: tuple[int, ...] = LEVELS,
                  iterations: int = 30, margin: int = 4) -> Polish:
    """Polish an optical -> SAR transform (ORIGINAL px) by dense affine alignment, coarse to fine.

    Args:
        optical, sar: the prepared images (their working resolution is the finest level).
        matrix: 3x3 start transform, e.g. a hypothesis of :func:`promptmid.search.global_search`; it must be
            within a few coarse-level pixels of the answer (the basin of the coarsest level).
        levels: long sides (px) of the pyramid levels, coarse first; each is capped at the working size.
        iterations: most Gauss-Newton steps per level.
        margin: erosion (level px) of the valid masks.
    """
    gray0, gray1 = optical.image.mean(-1), sar.image.mean(-1)
    start = work = working_transform(matrix, optical, sar)
    sides = sorted({min(s, max(gray0.shape)) for s in levels})
    score = start_score = float("nan")
    steps = 0
    for long_side in sides:
        g0, v0, s0 = _level(gray0, optical.valid, long_side)
        g1, v1, s1 = _level(gray1, sar.valid, round(long_side * max(gray1.shape) / max(gray0.shape)))
        aligner = _Aligner(g0, v0, g1, v1, margin)
        if long_side == sides[-1]:  # the finest level judges the whole polish against the start
            first = aligner.evaluate(s1 @ start @ np.linalg.inv(s0))
            start_score = float("nan") if first is None else first[0]
        level_matrix, score, n = _align_level(aligner, s1 @ work @ np.linalg.inv(s0), iterations)
        work, steps = np.linalg.inv(s1) @ level_matrix @ s0, steps + n
    if not np.isfinite(score) or (np.isfinite(start_score) and score <= start_score):
        return Polish(np.asarray(matrix, np.float64), start_score, start_score, steps)
    return Polish(original_transform(work, optical, sar), score, start_score, steps)
