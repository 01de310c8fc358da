"""The tile grid of a scene: optical windows over the overlap, and an even subset of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from promptmid.errors import InputError


@dataclass
class Tile:
    """One optical window ``[x0, x0 + w) x [y0, y0 + h)`` and its QC numbers.

    ``transform`` is the tile's own fit as a 3x3 optical SCENE px -> SAR-grid px matrix (``None`` without one);
    ``disagreement_px`` the RMS distance (SAR px, over a 3x3 grid of the tile) between that fit and the scene's
    global model; ``prior_departure_px`` the largest distance between the tile fit and the prior over the tile's
    corners; ``agrees``: the tile's fit agrees with the global model (see :mod:`promptmid.scene.agreement`);
    ``verdict`` / ``confidence``: the QC verdict of the tile's own keypoint fit (:mod:`promptmid.qc`; an area-shift
    fit is ``"uncertain"``: one correlation peak, no independent evidence).
    """

    index: int
    row: int
    col: int
    x0: int
    y0: int
    w: int
    h: int
    status: str = "pending"  # ok | failed | rejected | empty | outside | error
    reason: str = ""
    matches: int = 0
    inliers: int = 0
    global_inliers: int = 0
    rmse_px: float | None = None
    seconds: float = 0.0
    transform: list[list[float]] | None = None
    disagreement_px: float | None = None
    prior_departure_px: float | None = None
    agrees: bool = False
    method: str = ""  # "keypoints" or "area shift": where the tile's fit comes from
    area_shift: dict | None = None  # the whole-tile area-based shift (px after the prior), peak, distinctness
    keypoints_vs_shift_px: float | None = None  # RMS distance between the keypoint fit and the area shift
    verdict: str | None = None  # ok | uncertain | failed: QC verdict of the tile's fit (None: not matched)
    confidence: float | None = None  # QC confidence of the tile's keypoint fit in [0, 1]

    @property
    def matrix(self) -> np.ndarray | None:
        """The tile's own fit as a 3x3 array (``None`` without one)."""
        return None if self.transform is None else np.asarray(self.transform, np.float64)

    def grid_points(self, n: int = 3) -> np.ndarray:
        """``[n * n, 2]`` optical scene px spread over the tile (corners included)."""
        xs, ys = np.linspace(self.x0, self.x0 + self.w - 1, n), np.linspace(self.y0, self.y0 + self.h - 1, n)
        return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)


def tile_grid(bbox: tuple[int, int, int, int], tile: int, overlap: int) -> list[Tile]:
    """Tiles of side ``tile`` with ``overlap`` px overlap covering ``bbox = (x0, y0, x1, y1)``.

    The last row/column is shifted back so every tile is full size (if the box allows it).
    """
    if tile < 64 or not 0 <= overlap < tile:
        raise InputError(f"Need --tile >= 64 and 0 <= --overlap < --tile (got {tile}, {overlap}).")
    x0, y0, x1, y1 = bbox
    xs, ys = _starts(x0, x1, tile, overlap), _starts(y0, y1, tile, overlap)
    return [Tile(r * len(xs) + c, r, c, x, y, min(tile, x1 - x), min(tile, y1 - y))
            for r, y in enumerate(ys) for c, x in enumerate(xs)]


def scene_tiles(bbox: tuple[int, int, int, int], tile: int, overlap: int, single_side: int | None) -> list[Tile]:
    """The tile grid of a scene: ONE tile over the whole ``bbox`` when both its sides fit in ``single_side`` px
    (the matcher's working size: splitting a scene the matcher can take whole only adds tiles that disagree),
    else :func:`tile_grid`."""
    x0, y0, x1, y1 = bbox
    if single_side and max(x1 - x0, y1 - y0) <= single_side:
        tile_grid(bbox, tile, overlap)  # same option checks
        return [Tile(0, 0, 0, x0, y0, x1 - x0, y1 - y0)]
    return tile_grid(bbox, tile, overlap)


def _starts(lo: int, hi: int, tile: int, overlap: int) -> list[int]:
    if hi - lo <= tile:
        return [lo]
    n = int(np.ceil((hi - lo - overlap) / (tile - overlap)))
    return [int(round(v)) for v in np.linspace(lo, hi - tile, n)]


def select_tiles(tiles: list[Tile], max_tiles: int | None) -> list[Tile]:
    """At most ``max_tiles`` tiles, spread evenly over the grid (all when ``None``)."""
    if not max_tiles or len(tiles) <= max_tiles:
        return tiles
    rows, cols = max(t.row for t in tiles) + 1, max(t.col for t in tiles) + 1
    k = int(np.ceil(np.sqrt(max_tiles * rows / cols)))
    pick_r = np.unique(np.linspace(0, rows - 1, min(rows, k)).round().astype(int))
    per_row = max(1, max_tiles // len(pick_r))
    pick_c = np.unique(np.linspace(0, cols - 1, min(cols, per_row)).round().astype(int))
    chosen = [t for t in tiles if t.row in pick_r and t.col in pick_c]
    return chosen[:max_tiles]


def centres(tiles: list[Tile]) -> np.ndarray:
    """``[N, 2]`` tile centres (optical scene px)."""
    return np.array([[t.x0 + (t.w - 1) / 2, t.y0 + (t.h - 1) / 2] for t in tiles], np.float64).reshape(-1, 2)


def spread_order(tiles: list[Tile]) -> list[Tile]:
    """``tiles`` reordered so that every prefix is spread over the scene: the tile nearest the centre of them all
    first, then each time the tile farthest from those already ordered (farthest-point order; ties: grid order).
    Matching tiles in this order lets a scene stop early (``SceneOptions.settle``) with tiles all over it."""
    if len(tiles) <= 2:
        return list(tiles)
    c = centres(tiles)
    first = int(np.argmin(np.linalg.norm(c - c.mean(axis=0), axis=1)))
    order, dist = [first], np.linalg.norm(c - c[first], axis=1)
    for _ in range(len(tiles) - 1):
        nxt = int(np.argmax(dist))
        order.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(c - c[nxt], axis=1))
    return [tiles[i] for i in order]


def spans(part: list[Tile], whole: list[Tile], fraction: float = 0.5) -> bool:
    """The centres of ``part`` spread at least ``fraction`` as far as those of ``whole`` along both principal axes
    of ``whole`` (standard deviations; an axis ``whole`` does not extend along is no constraint): enough spread for
    a global model fitted to ``part`` to hold over ``whole``."""
    if len(part) < 3:
        return False
    w = centres(whole)
    _, vecs = np.linalg.eigh(np.cov(w.T))
    sd_part, sd_whole = (centres(part) @ vecs).std(axis=0), (w @ vecs).std(axis=0)
    return bool(np.all(sd_part >= fraction * sd_whole - 1e-9))
