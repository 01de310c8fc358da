"""Matching one tile (chip through the prior, Matcher, matches back in scene pixels) and the coarse prior."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable
import time

import numpy as np

from promptmid.geometry import apply_transform, translation
from promptmid.scene.agreement import as_mapping, distance_rms
from promptmid.scene.grid import Tile
from promptmid.scene.shift import TileShift, similarity, tile_shift
from promptmid.scene.windows import read_overview, read_window, sar_chip, window_raster

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
               sar_fill: float, found: SceneMatches, area_shift: bool = True, agree_px: float = 6.0) -> None:
    """Match one tile (optical window vs SAR chip through the prior); record its fit and tie points.

    The tile's fit is its keypoint fit (Matcher, with area-based refinement) unless ``area_shift`` is on, the
    whole-tile area-based shift (:func:`promptmid.scene.shift.tile_shift`) is distinct, and either the keypoint fit
    failed or it lies more than ``agree_px`` (RMS over the tile, SAR px) from the shift AND aligns the tile worse
    (:func:`promptmid.scene.shift.similarity`): then the tile's fit is the prior shifted by that shift
    (``tile.method == "area shift"``), and its tie points are the tile's 3x3 grid mapped by it. Updates ``tile`` in place. Tie points: optical = tile px + tile origin; SAR = ``prior @ (chip px + chip
    origin)``.
    """
    from promptmid.errors import PromptMIDError

    t0 = time.perf_counter()
    chip_to_sar = prior @ translation(tile.x0 - margin, tile.y0 - margin)
    to_scene = lambda m: chip_to_sar @ m @ translation(-tile.x0, -tile.y0)  # noqa: E731 - tile->chip as scene->SAR
    try:
        chip = sar_chip(sar_ds, chip_to_sar, (tile.w + 2 * margin, tile.h + 2 * margin), sar_fill)
        if chip is None:
            tile.status, tile.reason = "outside", "predicted SAR window lies outside the SAR image"
            return
        opt, sar = window_raster(read_window(opt_ds, tile.x0, tile.y0, tile.w, tile.h), opt_ds), window_raster(chip, sar_ds)
        del chip
        if area_shift:  # each window prepared once, at full resolution, for the shift; the matcher gets it downscaled
            opt, sar = prepare_full(matcher, opt, "optical"), prepare_full(matcher, sar, "sar")
        # the whole-tile area shift below is the scene's area hypothesis: the global search around the prior made
        # small chips less repeatable (BigEarthNet 120 px: 2.4-3.3 px between runs with and without an injected
        # georeferencing offset, against < 1 px without it), so tiles match with keypoints only
        result = matcher.match(*working(matcher, opt, sar), search=False)
        shift = _area_shift(opt, sar, margin) if area_shift else None
    except PromptMIDError as exc:
        tile.status, tile.reason = "empty", str(exc)
        return
    finally:
        tile.seconds = time.perf_counter() - t0
    tile.matches, tile.inliers = len(result.points0), result.num_inliers
    tile.verdict, tile.confidence = result.status, result.confidence
    kp = to_scene(result.transform) if result.transform is not None else None
    sh = to_scene(shift[0].matrix()) if shift is not None and shift[0].ok else None
    if shift is not None:
        tile.area_shift = {"sx": shift[0].sx - margin, "sy": shift[0].sy - margin, "peak": shift[0].peak,
                           "distinct": shift[0].distinct, "accepted": shift[0].ok}
    if kp is not None and sh is not None:
        tile.keypoints_vs_shift_px = distance_rms(as_mapping(kp), as_mapping(sh), tile.grid_points())
        if tile.keypoints_vs_shift_px > agree_px:  # two hypotheses: the one that aligns the tile better wins
            score_kp, score_sh = shift[1](result.transform), shift[1](shift[0].matrix())
            tile.area_shift.update(similarity_keypoints=score_kp, similarity_shift=score_sh)
            if score_kp >= score_sh:
                sh = None
    if kp is not None and (sh is None or tile.keypoints_vs_shift_px <= agree_px):
        keep = result.inliers
        tile.status, tile.reason, tile.method, tile.transform = "ok", "", "keypoints", kp.tolist()
        tile.rmse_px = float(result.rmse)
        _add(found, tile, result.points0[keep] + [tile.x0, tile.y0], apply_transform(chip_to_sar, result.points1[keep]),
             result.scores[keep])
    elif sh is not None:
        why = ("keypoint fit failed" if kp is None else f"keypoint fit {tile.keypoints_vs_shift_px:.1f} px away "
               "aligned the tile worse")
        tile.status, tile.method, tile.transform = "ok", "area shift", sh.tolist()
        tile.verdict, tile.confidence = "uncertain", None
        tile.reason = f"area-based shift used ({why})"
        grid = tile.grid_points()
        _add(found, tile, grid, apply_transform(sh, grid), np.full(len(grid), shift[0].peak))
    else:
        tile.status, tile.reason = "failed", result.reason


def _add(found: SceneMatches, tile: Tile, p0: np.ndarray, p1: np.ndarray, scores: np.ndarray) -> None:
    found.p0.append(p0)
    found.p1.append(p1)
    found.scores.append(scores)
    found.tile.append(np.full(len(p0), tile.index))
    found.tile_inlier.append(np.ones(len(p0), bool))


def prepare_full(matcher: Any, raster: Any, modality: str) -> Any:
    """``raster`` prepared with the matcher's I/O settings at full resolution (:func:`promptmid.io.load_image`)."""
    from promptmid.io import load_image

    return load_image(raster, modality, **{**getattr(matcher, "conf", {}).get("io", {}), "max_side": None})


def working(matcher: Any, *images: Any) -> list[Any]:
    """Full-resolution prepared images at the matcher's working resolution (``io.max_side``): what
    ``matcher.match`` would prepare from their rasters (:func:`promptmid.io.downscale_prepared`)."""
    from promptmid.io import PreparedImage, downscale_prepared

    side = getattr(matcher, "conf", {}).get("io", {}).get("max_side")
    return [downscale_prepared(im, side) if isinstance(im, PreparedImage) else im for im in images]


def _area_shift(o: Any, s: Any, margin: int) -> tuple[TileShift, Callable[[np.ndarray], float]] | None:
    """:func:`tile_shift` of the tile and chip prepared at full resolution (same scaling and bands as the matcher,
    :func:`prepare_full`), and a scorer of any tile px -> chip px hypothesis (:func:`similarity`)."""
    tile, chip = o.image.mean(axis=-1), s.image[..., 0]
    found = tile_shift(tile, o.valid, chip, s.valid, margin)
    return None if found is None else (found, lambda m: similarity(tile, o.valid, chip, s.valid, m))


def coarse_prior(matcher: Any, opt_ds: Any, sar_ds: Any, max_side: int) -> tuple[np.ndarray | None, str]:
    """Optical px -> SAR px prior from matching decimated overviews (long side ``max_side``)."""
    from promptmid.errors import PromptMIDError

    opt, s_opt = read_overview(opt_ds, max_side)
    sar, s_sar = read_overview(sar_ds, max_side)
    try:
        r = matcher.match(window_raster(opt, opt_ds), window_raster(sar, sar_ds))
    except PromptMIDError as exc:
        return None, f"coarse match of overviews failed: {exc}"
    if r.transform is None:
        return None, f"coarse match of overviews failed: {r.reason}"
    return s_sar @ r.transform @ np.linalg.inv(s_opt), ""
