"""The tile grid of a scene: optical windows over the overlap, and an even subset of them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from promptmid.errors import InputError

@dataclass
class Tile:
    """One optical window ``[x0, x0 + w) x [y0, y0 + h)`` and its QC numbers."""

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
