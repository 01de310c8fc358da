"""How well the optical image and the SAR image align under a transform, measured on the images themselves.

Two statistics, both on the optical grid reduced to at most 256 px with the SAR warped onto it by the transform
(nodata excluded), and both independent of the keypoint matches:

- :func:`dense_evidence`: a normalised correlation of oriented-gradient features over shifts up to 15 % of the image
  (where it peaks, how high, how distinct) — the QC model's dense evidence (:mod:`promptmid.qc`);
- :func:`mutual_information_evidence`: how much more the intensities depend on each other at the transform than a
  few pixels off — a statistic independent of the gradient channels, weighed by the pick
  (:func:`promptmid.selection.pick`).

Coordinates: ``matrix`` maps ORIGINAL optical pixels to ORIGINAL SAR pixels; offsets are reported in optical px of
the original image.
"""

from __future__ import annotations

import cv2
import numpy as np

from promptmid.dense import channel_ncc, gray, oriented_gradient_features
from promptmid.geometry import Size, warp_to_optical, working_transform
from promptmid.io import PreparedImage


def _reduced_grid(optical: PreparedImage, sar: PreparedImage, matrix: np.ndarray, max_side: int
                  ) -> tuple[Size, np.ndarray, float]:
    """The optical grid reduced to ``max_side`` px: its size, the transform from it to SAR working pixels, and
    the reduction factor (reduced px per optical working px)."""
    h, w = optical.image.shape[:2]
    f = min(1.0, max_side / max(h, w))
    size = Size(max(int(round(w * f)), 8), max(int(round(h * f)), 8))
    down = np.array([[f, 0.0, 0.5 * f - 0.5], [0.0, f, 0.5 * f - 0.5], [0.0, 0.0, 1.0]])  # working -> reduced px
    return size, working_transform(matrix, optical, sar) @ np.linalg.inv(down), f


def _quantize(values: np.ndarray, valid: np.ndarray, bins: int) -> np.ndarray:
    """Intensities as bin indices ``0..bins-1`` between the 1st and 99th percentile of the ``valid`` ones."""
    lo, hi = np.percentile(values[valid], (1, 99)) if valid.any() else (0.0, 1.0)
    return np.clip(((values - lo) / max(hi - lo, 1e-9) * bins).astype(np.int64), 0, bins - 1)


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, bins: int) -> float:
    """``(H(a) + H(b)) / H(a, b)`` of two equally long arrays of bin indices in ``0..bins-1``: 1 for independent
    intensities, 2 for one a function of the other; NaN for an empty sample."""
    if a.size == 0:
        return float("nan")
    joint = np.bincount(a * bins + b, minlength=bins * bins).astype(np.float64)
    joint /= joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    grid = joint.reshape(bins, bins)
    return (entropy(grid.sum(1)) + entropy(grid.sum(0))) / max(entropy(joint), 1e-12)


MI_BINS = 64  # intensity bins of the mutual information (64 x 64 joint histogram on a 256 px grid)
MI_RADIUS = 6  # the shifted copies it is compared with: up to this many reduced px (256 px grid) in x and y ...
MI_STEP = 2  # ... every this many px (48 copies)
MI_MIN_PIXELS = 500  # fewer overlapping pixels than this: no evidence


def mutual_information_evidence(optical: PreparedImage, sar: PreparedImage, matrix: np.ndarray,
                                max_side: int = 256) -> dict[str, float]:
    """Whether the intensities of the optical image and the SAR warped by ``matrix`` depend on each other most at
    the transform itself: a statistical cue independent of the oriented gradients that the area search, the
    refinement and :func:`dense_evidence` correlate.

    Both are reduced to ``max_side`` px; the SAR is warped once onto the optical grid padded by
    :data:`MI_RADIUS` px and the normalised mutual information (:func:`normalized_mutual_information`,
    :data:`MI_BINS` bins) of the overlap (8 px from the border, nodata excluded) is taken at zero shift and at the
    48 shifts of up to :data:`MI_RADIUS` px (every :data:`MI_STEP` px).

    Returns:
        ``mi_at_zero``: the NMI at the transform; ``mi_peak``: how far it stands above the median NMI of the
        shifted copies, in thousandths (about 1-4 for a right transform, about 0 for a wrong one; NaN without
        enough overlap). Comparable between transforms of the same pair, not across pairs.
    """
    size, work, _ = _reduced_grid(optical, sar, matrix, max_side)
    r, (w, h) = MI_RADIUS, size
    padded = work @ np.array([[1.0, 0.0, -r], [0.0, 1.0, -r], [0.0, 0.0, 1.0]])  # padded px -> SAR working px
    canvas = warp_to_optical(gray(sar.image), padded, Size(w + 2 * r, h + 2 * r))
    canvas_valid = warp_to_optical(sar.valid.astype(np.float32), padded, Size(w + 2 * r, h + 2 * r)) > 0.99
    opt = cv2.resize(gray(optical.image), size, interpolation=cv2.INTER_AREA)
    valid0 = cv2.resize(optical.valid.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    border = np.zeros_like(valid0)
    border[8:-8, 8:-8] = True
    q0, q1 = _quantize(opt, valid0, MI_BINS), _quantize(canvas, canvas_valid, MI_BINS)
    scores = {}
    for dy in range(-r, r + 1, MI_STEP):
        for dx in range(-r, r + 1, MI_STEP):
            window = np.s_[r + dy:r + dy + h, r + dx:r + dx + w]
            mask = valid0 & border & canvas_valid[window]
            scores[dx, dy] = (normalized_mutual_information(q0[mask], q1[window][mask], MI_BINS)
                              if mask.sum() >= MI_MIN_PIXELS else float("nan"))
    at_zero = scores.pop((0, 0))
    others = np.array(list(scores.values()))
    enough = np.isfinite(at_zero) and np.isfinite(others).any()
    peak = (at_zero - np.nanmedian(others)) * 1000 if enough else float("nan")
    return {"mi_at_zero": at_zero, "mi_peak": float(peak)}


def dense_evidence(optical: PreparedImage, sar: PreparedImage, matrix: np.ndarray, max_side: int = 256,
                   search: float = 0.15) -> dict[str, float]:
    """Dense oriented-gradient correlation of the optical image and the SAR warped by ``matrix``.

    Both images are reduced to ``max_side`` px, the SAR is warped onto the optical grid, and the central
    part of the overlap is correlated (normalised, all orientation channels) at every shift up to
    ``search`` x the image size.

    Returns:
        ``dense_offset_px``: where the correlation peaks, as a shift in optical px of the original image
        (0 for a right transform); ``dense_peak``: the peak correlation; ``dense_distinctness``: peak minus
        the highest correlation farther than 3 % of the size from the peak (0 = ambiguous, e.g. periodic);
        ``dense_at_zero``: the correlation at zero shift (how well the transform itself aligns the images).
    """
    size, work, f = _reduced_grid(optical, sar, matrix, max_side)
    opt_small = cv2.resize(gray(optical.image), size, interpolation=cv2.INTER_AREA)
    valid0 = cv2.resize(optical.valid.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    warped = warp_to_optical(gray(sar.image), work, size)
    valid1 = warp_to_optical(sar.valid.astype(np.float32), work, size) > 0.99
    feat0, valid0 = _neutral_outside(oriented_gradient_features(opt_small, sigma=1.0), valid0)
    feat1, valid1 = _neutral_outside(oriented_gradient_features(warped, sigma=1.0), valid1)
    return _correlate(feat0, feat1, valid0 & valid1, int(round(search * min(size))), optical.scale, f)


def _neutral_outside(feat: np.ndarray, valid: np.ndarray, margin: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Replace features outside ``valid`` (eroded by ``margin`` px, where gradients see the border) by their mean
    inside, so that neither a footprint edge nor a nodata mask can correlate with anything.

    Returns:
        the features and the eroded mask.
    """
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    inner = cv2.erode(valid.astype(np.uint8), kernel, borderType=cv2.BORDER_REPLICATE).astype(bool)
    if not inner.any():
        return np.zeros_like(feat), inner
    out = feat.copy()
    out[:, ~inner] = feat[:, inner].mean(axis=1)[:, None]
    return out, inner


def _correlate(feat0: np.ndarray, feat1: np.ndarray, valid: np.ndarray, radius: int, scale: tuple[float, float],
               factor: float) -> dict[str, float]:
    """Correlate the bounding box of ``valid`` in ``feat0`` (shrunk by ``radius``) inside ``feat1`` (both neutral
    outside their own valid areas, see :func:`_neutral_outside`)."""
    nothing = {"dense_offset_px": float("inf"), "dense_peak": 0.0, "dense_distinctness": 0.0, "dense_at_zero": 0.0}
    ys, xs = np.nonzero(valid)
    if len(ys) == 0 or radius < 2:
        return nothing
    y0, y1, x0, x1 = ys.min() + radius, ys.max() - radius, xs.min() + radius, xs.max() - radius
    if y1 - y0 < 16 or x1 - x0 < 16:
        return nothing
    score = channel_ncc(feat1[:, y0 - radius:y1 + radius, x0 - radius:x1 + radius], feat0[:, y0:y1, x0:x1])
    score = np.nan_to_num(score, nan=-1.0)
    iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
    peak = float(score[iy, ix])
    exclusion = max(2, int(round(0.03 * min(valid.shape))))
    yy, xx = np.ogrid[: score.shape[0], : score.shape[1]]
    far = (np.abs(yy - iy) > exclusion) | (np.abs(xx - ix) > exclusion)
    second = float(score[far].max()) if far.any() else -1.0
    offset = np.hypot((ix - radius) * scale[0], (iy - radius) * scale[1]) / factor
    return {"dense_offset_px": float(offset), "dense_peak": peak, "dense_distinctness": peak - second,
            "dense_at_zero": float(score[radius, radius])}
