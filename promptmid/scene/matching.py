"""Matching one tile (chip through the prior, Matcher, matches back in scene pixels) and the coarse prior."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
import time

import numpy as np

from promptmid.geometry import apply_transform, translation
from promptmid.io import RasterImage
from promptmid.scene.grid import Tile
from promptmid.scene.windows import read_overview, read_window, sar_chip

@dataclass
class SceneMatches:
    """Tie points from all tiles in scene coordinates (optical px, SAR-grid px)."""

    p0: list[np.ndarray] = field(default_factory=list)
    p1: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    tile: list[np.ndarray] = field(default_factory=list)
    tile_inlier: list[np.ndarray] = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, ...]:
        def cat(items: list[np.ndarray], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
            return np.concatenate(items).astype(dtype) if items else np.zeros(shape, dtype)
        return (cat(self.p0, (0, 2), np.float64), cat(self.p1, (0, 2), np.float64), cat(self.scores, (0,), np.float32),
                cat(self.tile, (0,), np.int64), cat(self.tile_inlier, (0,), bool))


def match_tile(matcher: Any, opt_ds: Any, sar_ds: Any, prior: np.ndarray, tile: Tile, margin: int,
               sar_fill: float, found: SceneMatches) -> None:
    """Match one tile (optical window vs SAR chip through the prior); append its inlier tie points.

    Updates ``tile`` status/QC in place. Tie points: optical = tile px + tile origin;
    SAR = ``prior @ (chip px + chip origin)``.
    """
    from promptmid.errors import PromptMIDError

    t0 = time.perf_counter()
    chip_to_sar = prior @ translation(tile.x0 - margin, tile.y0 - margin)
    try:
        chip = sar_chip(sar_ds, chip_to_sar, (tile.w + 2 * margin, tile.h + 2 * margin), sar_fill)
        if chip is None:
            tile.status, tile.reason = "outside", "predicted SAR window lies outside the SAR image"
            return
        opt = RasterImage(read_window(opt_ds, tile.x0, tile.y0, tile.w, tile.h), nodata=opt_ds.nodata)
        result = matcher.match(opt, RasterImage(chip, nodata=sar_ds.nodata))
    except PromptMIDError as exc:
        tile.status, tile.reason = "empty", str(exc)
        return
    finally:
        tile.seconds = time.perf_counter() - t0
    tile.matches, tile.inliers = len(result.points0), result.num_inliers
    tile.status, tile.reason = ("ok", "") if result.ok else ("failed", result.reason)
    if result.ok:
        keep = result.inliers
        tile.rmse_px = float(result.rmse)
        found.p0.append(result.points0[keep] + [tile.x0, tile.y0])
        found.p1.append(apply_transform(chip_to_sar, result.points1[keep]))
        found.scores.append(result.scores[keep])
        found.tile.append(np.full(int(keep.sum()), tile.index))
        found.tile_inlier.append(np.ones(int(keep.sum()), bool))


def coarse_prior(matcher: Any, opt_ds: Any, sar_ds: Any, max_side: int) -> tuple[np.ndarray | None, str]:
    """Optical px -> SAR px prior from matching decimated overviews (long side ``max_side``)."""
    from promptmid.errors import PromptMIDError

    opt, s_opt = read_overview(opt_ds, max_side)
    sar, s_sar = read_overview(sar_ds, max_side)
    try:
        r = matcher.match(RasterImage(opt, nodata=opt_ds.nodata), RasterImage(sar, nodata=sar_ds.nodata))
    except PromptMIDError as exc:
        return None, f"coarse match of overviews failed: {exc}"
    if not r.ok:
        return None, f"coarse match of overviews failed: {r.reason}"
    return s_sar @ r.transform @ np.linalg.inv(s_opt), ""
