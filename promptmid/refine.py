"""Area-based refinement of a fitted transform with oriented-gradient channel features.

Keypoint matches between optical and SAR images localise structures only to a few pixels
(the modalities show edges at slightly different places, descriptors are coarse). After the
robust fit, the SAR image is warped onto the optical grid and both are turned into dense
channel features of oriented gradients (CFOG-style: |directional derivative| in ``n``
orientations, Gaussian-smoothed, normalised per pixel — Ye et al., IEEE TGRS 2019).
Blocks on a grid are matched by normalised cross-correlation within ``search`` px, peaks are
refined to sub-pixel, and a correction transform is fitted robustly to the block shifts.

Coordinates: (x, y) pixels of the working-resolution images; ``matrix`` maps optical
pixels to SAR pixels, like everywhere else.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from promptmid.dense import channel_ncc, gray, oriented_gradient_features, subpixel_peak
from promptmid.geometry import apply_transform, original_transform, working_transform
from promptmid.matching import fit_geometry

if TYPE_CHECKING:
    from promptmid.io import PreparedImage


@dataclass
class Refinement:
    """Outcome of :func:`refine_transform`.

    Attributes:
        matrix: refined optical -> SAR transform (the input one when refinement was not applied).
        applied: whether the refined transform replaced the input.
        blocks: blocks whose correlation peak was accepted / inliers of the correction fit.
        shift_px: median length of the accepted block shifts (optical px) before correction.
        reason: why refinement was not applied.
    """

    matrix: np.ndarray
    applied: bool
    blocks: int = 0
    inliers: int = 0
    shift_px: float = float("nan")
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "blocks": self.blocks, "inliers": self.inliers,
                "median_shift_px": None if not np.isfinite(self.shift_px) else round(self.shift_px, 3),
                "reason": self.reason}


def grid_step(shape: tuple[int, int], block: int, search: int, max_blocks: int | None) -> int:
    """Spacing (px) of the block grid: half a block, widened until at most ``max_blocks`` blocks fit (``None``: no
    limit). With 400, images up to about 700 px keep the half-block grid and a 1024 px scene tile gets 48 px spacing
    (400 blocks instead of 841). Off by default: measured, a cap saved no wall time on a quiet machine (1 MP scene
    12.4-13.0 s either way) and moved results (256: 1 MP scene 0.84 px vs 0.50; 400: a 3000 px test scene's tiles
    disagreed by 7-8 px)."""
    h, w = shape
    step = max(block // 2, 1)
    while max_blocks is not None and step < max(h, w) and \
            ((h - block - 2 * search) // step + 1) * ((w - block - 2 * search) // step + 1) > max_blocks:
        step += 1
    return step


def block_shifts(feat0: np.ndarray, feat1: np.ndarray, valid: np.ndarray, block: int, search: int,
                 min_distinct: float, max_blocks: int | None = None, workers: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Match blocks of ``feat0`` in ``feat1`` (``[C, H, W]``, same grid) within ``+-search`` px, on a grid of
    :func:`grid_step` spacing (at most ``max_blocks`` blocks), ``workers`` threads side by side (OpenCV releases the
    GIL; the same results in the same order).

    Returns:
        block centres ``[K, 2]`` (x, y) in ``feat0`` and their shifts ``[K, 2]`` (where the block
        content sits in ``feat1`` minus where it sits in ``feat0``).
    """
    h, w = valid.shape
    step = grid_step((h, w), block, search, max_blocks)
    corners = [(x0, y0) for y0 in range(search, h - block - search + 1, step)
               for x0 in range(search, w - block - search + 1, step)
               if valid[y0 - search:y0 + block + search, x0 - search:x0 + block + search].mean() >= 0.95]

    def match(corner: tuple[int, int]) -> tuple[list[float], list[float]] | None:
        x0, y0 = corner
        templ = feat0[:, y0:y0 + block, x0:x0 + block]
        area = feat1[:, y0 - search:y0 + block + search, x0 - search:x0 + block + search]
        px, py, _peak, distinct = subpixel_peak(channel_ncc(area, templ))
        if distinct < min_distinct:
            return None
        return [x0 + (block - 1) / 2, y0 + (block - 1) / 2], [px - search, py - search]

    if workers > 1 and len(corners) > 1:
        with ThreadPoolExecutor(workers) as pool:
            found = [m for m in pool.map(match, corners, chunksize=max(1, len(corners) // (4 * workers))) if m]
    else:
        found = [m for m in map(match, corners) if m]
    centres, shifts = [c for c, _ in found], [d for _, d in found]
    return np.asarray(centres, np.float64).reshape(-1, 2), np.asarray(shifts, np.float64).reshape(-1, 2)


def refine_transform(optical: np.ndarray, sar: np.ndarray, matrix: np.ndarray, optical_valid: np.ndarray,
                     sar_valid: np.ndarray, model: str = "affine", block: int = 64, search: int = 8,
                     min_distinct: float = 0.005, min_blocks: int = 8, threshold: float = 1.5,
                     iterations: int = 3, search_after: int | None = None, max_blocks: int | None = None,
                     workers: int = 1) -> Refinement:
    """Refine an optical -> SAR transform by block matching of oriented-gradient features.

    Args:
        optical: ``[h, w, 3]`` or ``[h, w]`` optical image in [0, 1] (working resolution).
        sar: ``[h', w', 3]`` or ``[h', w']`` SAR image in [0, 1] (working resolution).
        matrix: 3x3 optical -> SAR transform between these two images.
        optical_valid, sar_valid: validity masks of the two images.
        model: geometry model of the correction fit.
        block: block side (px); search: search radius (px); threshold: inlier threshold of the fit (px).
        min_distinct: how much the correlation peak must exceed the best score > 3 px away.
        min_blocks: fewer accepted blocks (or inliers) -> refinement is not applied.
        iterations: repeat (warp, match blocks, fit) while the median block shift exceeds 0.25 px.
        search_after: search radius of the passes after the first (default ``search``): a coarse start needs a
            wide first search, the passes after it only a narrow one.
        max_blocks: most blocks per pass (the grid spacing widens on large images; ``None``: half a block always).
        workers: threads matching blocks side by side (:func:`block_shifts`; the same result for any number).
    """
    result = Refinement(matrix, False, reason="not run")
    feat0, gray1 = oriented_gradient_features(gray(optical)), gray(sar)  # the same in every pass
    for i in range(iterations):
        radius = search if i == 0 or search_after is None else min(search, search_after)
        step = _refine_once(feat0, gray1, result.matrix, optical_valid, sar_valid, model, block, radius,
                            min_distinct, min_blocks, threshold, max_blocks, workers)
        if not step.applied:
            return result if result.applied else step
        result = step
        if step.shift_px < 0.25:
            break
    return result


def _refine_once(feat0: np.ndarray, gray1: np.ndarray, matrix: np.ndarray, optical_valid: np.ndarray,
                 sar_valid: np.ndarray, model: str, block: int, search: int, min_distinct: float, min_blocks: int,
                 threshold: float, max_blocks: int | None = None, workers: int = 1) -> Refinement:
    """One pass of :func:`refine_transform`: ``feat0`` the optical features (:func:`oriented_gradient_features`),
    ``gray1`` the SAR gray values (float32)."""
    h, w = feat0.shape[-2:]
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(gray1, matrix, (w, h), flags=flags)
    warped_valid = cv2.warpPerspective(sar_valid.astype(np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST
                                       | cv2.WARP_INVERSE_MAP).astype(bool)
    valid = optical_valid & warped_valid
    centres, shifts = block_shifts(feat0, oriented_gradient_features(warped), valid,
                                   block, search, min_distinct, max_blocks, workers)
    if len(centres) < min_blocks:
        return Refinement(matrix, False, len(centres), reason=f"only {len(centres)} textured blocks")
    # block content at optical c is found at c + d in the warped SAR, i.e. at SAR matrix(c + d)
    target = apply_transform(matrix, centres + shifts)
    fit = fit_geometry(centres, target, model, threshold, min_inliers=min_blocks)
    median_shift = float(np.median(np.linalg.norm(shifts, axis=1)))
    if not fit.ok:
        return Refinement(matrix, False, len(centres), shift_px=median_shift, reason=fit.reason)
    return Refinement(fit.matrix, True, len(centres), fit.num_inliers, median_shift)


def refine_prepared(optical: PreparedImage, sar: PreparedImage, matrix: np.ndarray, model: str = "affine",
                    **conf: Any) -> Refinement:
    """:func:`refine_transform` for a transform between ORIGINAL pixels of two prepared images.

    The refinement runs at working resolution; the returned ``matrix`` is in original pixels.
    """
    work = working_transform(matrix, optical, sar)
    ref = refine_transform(optical.image, sar.image, work, optical.valid, sar.valid, model, **conf)
    ref.matrix = original_transform(ref.matrix, optical, sar)
    return ref
