"""Dense modality-robust features and correlation peaks, shared by the area search, the polish, the refinement,
the QC evidence and the scene shift search.

The features are channel features of oriented gradients (CFOG-style: |directional derivative| in ``n``
orientations, Gaussian-smoothed, normalised per pixel — Ye et al., IEEE TGRS 2019): edges of optical and SAR images
agree in direction far better than in brightness. Coordinates: (x, y) pixels, pixel centres at integers.
"""

from __future__ import annotations

import cv2
import numpy as np


def gray(image: np.ndarray) -> np.ndarray:
    """``[h, w]`` float32 gray values of an ``[h, w, 3]`` image (the mean of its channels) or an ``[h, w]`` one."""
    return (image.mean(-1) if image.ndim == 3 else image).astype(np.float32)


def oriented_gradient_features(gray: np.ndarray, orientations: int = 9, sigma: float = 2.0,
                               normalise: bool = True) -> np.ndarray:
    """Dense oriented-gradient channels ``[orientations, H, W]`` (float32), L2-normalised per pixel.

    Args:
        gray: ``[H, W]`` float image.
        orientations: number of directions in ``[0, 180)`` degrees.
        sigma: Gaussian smoothing (px) of each channel.
        normalise: ``False``: the smoothed magnitudes, not normalised per pixel.
    """
    g = gray.astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    angles = np.pi * np.arange(orientations) / orientations
    chans = [cv2.GaussianBlur(np.abs(float(np.cos(a)) * gx + float(np.sin(a)) * gy), (0, 0), sigma) for a in angles]
    feats = np.stack(chans, axis=0)
    if normalise:
        feats = feats / (np.linalg.norm(feats, axis=0, keepdims=True) + 1e-6)
    return np.ascontiguousarray(feats, dtype=np.float32)


def parabolic_offset(m1: float, c: float, p1: float) -> float:
    """Sub-pixel position (in [-0.5, 0.5] px) of a peak ``c`` between its neighbours ``m1`` and ``p1`` from a
    quadratic fit; 0 when the three values do not make a peak."""
    den = m1 - 2 * c + p1
    return 0.0 if den >= 0 else float(np.clip(0.5 * (m1 - p1) / den, -0.5, 0.5))


def subpixel_peak(score: np.ndarray, exclusion: int = 3) -> tuple[float, float, float, float]:
    """Peak (x, y) of a correlation map (quadratic sub-pixel fit), its value and its distinctness.

    Distinctness = peak minus the highest score farther than ``exclusion`` px from the peak, so a
    ridge (an edge that slides along itself) scores ~0 and is rejected like a flat map.
    """
    iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
    peak = float(score[iy, ix])
    yy, xx = np.ogrid[: score.shape[0], : score.shape[1]]
    far = (np.abs(yy - iy) > exclusion) | (np.abs(xx - ix) > exclusion)
    distinct = peak - float(score[far].max()) if far.any() else 0.0

    dx = parabolic_offset(score[iy, ix - 1], peak, score[iy, ix + 1]) if 0 < ix < score.shape[1] - 1 else 0.0
    dy = parabolic_offset(score[iy - 1, ix], peak, score[iy + 1, ix]) if 0 < iy < score.shape[0] - 1 else 0.0
    return ix + dx, iy + dy, peak, distinct


def channel_ncc(area: np.ndarray, templ: np.ndarray) -> np.ndarray:
    """Mean over channels of the zero-mean normalised cross-correlation (OpenCV's ``TM_CCOEFF_NORMED``) of
    ``templ`` ``[C, h, w]`` at every position inside ``area`` ``[C, H, W]``: ``[H - h + 1, W - w + 1]``, entry
    ``(y, x)`` for the template's top-left corner at area px ``(x, y)``."""
    return sum(cv2.matchTemplate(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(t, np.float32),
                                 cv2.TM_CCOEFF_NORMED) for a, t in zip(area, templ)) / len(templ)
