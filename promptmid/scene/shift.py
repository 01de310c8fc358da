"""Area-based shift of a whole tile inside its SAR chip (the check and fallback of a tile's keypoint fit).

Georeferencing errors between two products are mostly a shift over a tile. The optical tile and the SAR chip (the
SAR resampled through the prior onto the optical grid, ``margin`` px larger on every side) are turned into dense
oriented-gradient channels (CFOG-style, :func:`promptmid.dense.oriented_gradient_features`), the whole tile is
correlated over every shift within ``+-margin`` px (normalised cross-correlation, averaged over the channels) and the
peak is located to sub-pixel: a coarse pass at reduced resolution, then a full-resolution pass within a few pixels
of it. This is the AROSICS-style global shift, with modality-robust features.

Coordinates: the returned shift ``(sx, sy)`` means tile pixel ``p`` (x, y) shows the content of chip pixel
``p + (sx, sy)``; ``(margin, margin)`` is "the prior is exact".
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from promptmid.dense import channel_ncc, oriented_gradient_features, subpixel_peak

COARSE_SIDE = 384  # long side (px) of the coarse pass
FINE_SEARCH = 3  # +- px of the full-resolution pass around the coarse peak
MIN_DISTINCT = 0.02  # peak minus the best score > 3 px away (coarse pass), for the shift to count


@dataclass
class TileShift:
    """A tile's area-based shift.

    Attributes:
        sx, sy: tile px -> chip px offset (see the module docstring).
        peak: mean NCC at the peak; distinct: peak minus the best score farther than 3 px (coarse pass).
    """

    sx: float
    sy: float
    peak: float
    distinct: float

    @property
    def ok(self) -> bool:
        return self.distinct >= MIN_DISTINCT

    def matrix(self) -> np.ndarray:
        """3x3 tile px -> chip px."""
        return np.array([[1.0, 0.0, self.sx], [0.0, 1.0, self.sy], [0.0, 0.0, 1.0]])


def _features(gray: np.ndarray, valid: np.ndarray, factor: float) -> np.ndarray:
    g = np.where(valid, gray, float(np.median(gray[valid])) if valid.any() else 0.0).astype(np.float32)
    if factor < 1.0:
        g = cv2.resize(g, (max(8, round(g.shape[1] * factor)), max(8, round(g.shape[0] * factor))),
                       interpolation=cv2.INTER_AREA)
    return oriented_gradient_features(g, sigma=2.0)


def similarity(tile: np.ndarray, tile_valid: np.ndarray, chip: np.ndarray, chip_valid: np.ndarray,
               matrix: np.ndarray) -> float:
    """How well ``matrix`` (3x3 tile px -> chip px) aligns the chip with the tile: mean NCC over channels of
    the oriented-gradient features of the tile and of the chip warped onto the tile grid (at the coarse pass's
    resolution), times the share of the tile's valid pixels that land on valid chip pixels (a hypothesis that maps
    the tile onto fill explains less of it). The same score for any hypothesis (keypoint fit or area shift), so
    they can be compared."""
    h, w = tile.shape
    warped = cv2.warpAffine(chip.astype(np.float32), np.asarray(matrix, np.float64)[:2], (w, h),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=0.0)
    wvalid = cv2.warpAffine(chip_valid.astype(np.uint8), np.asarray(matrix, np.float64)[:2], (w, h),
                            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0).astype(bool)
    f = min(1.0, COARSE_SIDE / max(h, w))
    both = tile_valid & wvalid
    if not both.any():
        return 0.0
    ncc = float(channel_ncc(_features(warped, both, f), _features(tile, both, f)).max())
    return ncc * float(both.sum()) / max(1, int(tile_valid.sum()))


def tile_shift(tile: np.ndarray, tile_valid: np.ndarray, chip: np.ndarray, chip_valid: np.ndarray,
               margin: int) -> TileShift | None:
    """Shift of ``tile`` ``[h, w]`` inside ``chip`` ``[h + 2m, w + 2m]`` (both gray in [0, 1], same pixel size).

    Returns ``None`` when the tile or the search range is too small.
    """
    h, w = tile.shape
    if margin < 1 or min(h, w) < 16:
        return None
    f = min(1.0, COARSE_SIDE / max(h, w))
    s = channel_ncc(_features(chip, chip_valid, f), _features(tile, tile_valid, f))
    cx, cy, _peak, distinct = subpixel_peak(s)
    # full resolution, +-FINE_SEARCH around the coarse peak (chip window cut to that range)
    x0 = int(np.clip(round(cx / f) - FINE_SEARCH, 0, 2 * margin))
    y0 = int(np.clip(round(cy / f) - FINE_SEARCH, 0, 2 * margin))
    x1, y1 = min(2 * margin, x0 + 2 * FINE_SEARCH), min(2 * margin, y0 + 2 * FINE_SEARCH)
    window = (slice(y0, y1 + h), slice(x0, x1 + w))
    fine = channel_ncc(_features(chip[window], chip_valid[window], 1.0), _features(tile, tile_valid, 1.0))
    fx, fy, peak, _ = subpixel_peak(fine)
    return TileShift(x0 + fx, y0 + fy, peak, distinct)
