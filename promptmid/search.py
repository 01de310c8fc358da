"""Global area-based search: transform hypotheses without keypoints.

Where keypoints detected independently in each image rarely land on the same ground point (10 m SAR
tiles, flat or speckled scenes), the displacement can still be found by correlating dense,
modality-robust features of the whole images. This stage searches a grid of rotations x scales of the
SAR image and, for each, every translation at once with an FFT; the best peaks become hypotheses, each
polished on a finer grid of (rotation, scale, shift) at a finer resolution. The area-based refinement
and the QC stage (:func:`promptmid.selection.choose`) then decide between these hypotheses and the keypoint fit.

Features: the oriented-gradient channels of :func:`promptmid.dense.oriented_gradient_features`
(gradient magnitude in ``orientations`` directions, smoothed, normalised per pixel), which ignore the
sign of the contrast, so an edge that is bright in one modality and dark in the other still correlates.
Optionally (``learned``: ALIKED's channels, :class:`promptmid.models.dense_features.SearchFeatures`, with a fixed
random or a trained projection) a few channels of a learned dense feature map are stacked onto them: computed once
per image, reduced to each level and warped with the SAR canvases like the gray values. The presets run both searches, without and with them (``search.learned =
"both-trained"``: the trained projection, :meth:`promptmid.api.Matcher.search_channels`), and pool their hypotheses;
:func:`pooled_search` runs them together, sharing the coarse level's canvases and FFTs.
Correlation: masked normalised cross-correlation (Padfield, IEEE TIP 2012) summed over the channels;
nodata, fill and the footprint edge are masked out and never correlate; shifts whose overlap is below
``min_overlap`` of the smaller valid area are not considered.

Coordinates: (x, y) pixels, pixel centres at integers, origin top-left; every hypothesis ``matrix``
maps ORIGINAL optical pixels to ORIGINAL SAR pixels, like every transform in promptmid.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from promptmid.config import DEFAULTS, merge_options
from promptmid.correlation import Correlator, fft_workers
from promptmid.geo import pixel_size_ratio
from promptmid.geometry import apply_transform, corner_error
from promptmid.geometry import working_transform
from promptmid.io import PreparedImage
from promptmid.search_fine import Fine, Hypothesis, Peak, channel_indices, peak_matrix, polish_all, shared_base
from promptmid.search_levels import Level, canvas_of, canvas_shape, make_level, stack_learned

# the keys of the config's search section that the Matcher reads (whether and with what to search), not the search
MATCHER_KEYS = ("enabled", "learned", "skip_when_ok", "ranker", "dense")
DEFAULT_CONF: dict[str, Any] = {k: v for k, v in DEFAULTS["search"].items() if k not in MATCHER_KEYS}
# a learned dense feature map of a prepared image: [h, w, C] float32 at any resolution covering the whole image
LearnedFeatures = Callable[[PreparedImage], np.ndarray]


def search_scales(conf: dict[str, Any]) -> np.ndarray:
    """The coarse scales: ``scale_steps`` values spaced geometrically over ``scale_range``."""
    lo, hi = conf["scale_range"]
    return np.geomspace(lo, hi, int(conf["scale_steps"])) if conf["scale_steps"] > 1 else np.array([math.sqrt(lo * hi)])


def search_angles(conf: dict[str, Any]) -> np.ndarray:
    """The coarse rotations (deg): ``-range .. +range`` by ``rotation_step`` (the whole circle once for 180)."""
    rng, step = float(conf["rotation_range"]), float(conf["rotation_step"])
    if rng >= 180.0:
        return np.arange(-180.0, 180.0, step)
    n = int(math.floor(rng / step + 1e-9))
    return step * np.arange(-n, n + 1, dtype=float)


def check_conf(conf: dict[str, Any]) -> dict[str, Any]:
    """:data:`DEFAULT_CONF` updated with ``conf``; raises ``ValueError`` for unknown keys or values out of range."""
    c = merge_options(DEFAULT_CONF, conf, "search")
    lo, hi = c["scale_range"]
    checks = [(0 < lo <= hi, "scale_range must be 0 < low <= high"),
              (0 <= c["rotation_range"] <= 180, "rotation_range must be in [0, 180] degrees"),
              (c["rotation_step"] > 0, "rotation_step must be > 0"),
              (c["scale_steps"] >= 1 and c["top_k"] >= 1, "scale_steps and top_k must be >= 1"),
              (c["polished_peaks"] >= 1, "polished_peaks must be >= 1"),
              (0 < c["min_overlap"] < 1, "min_overlap must be in (0, 1)"),
              (32 <= c["coarse_size"] <= c["size"], "need 32 <= coarse_size <= size")]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"search: {message}")
    return c


# --- the search ---------------------------------------------------------------------------------------


def global_search(optical: PreparedImage, sar: PreparedImage, conf: dict[str, Any] | None = None,
                  prior: np.ndarray | None = None, learned: LearnedFeatures | None = None) -> list[Hypothesis]:
    """Transform hypotheses of ``sar`` against ``optical`` by the coarse-to-fine area search.

    Without ``prior`` the prior is "same footprint" (each image reduced to the same long side, centres aligned),
    with the scale of the pixel sizes when both images are georeferenced in the same CRS; rotation, scale and
    shift are searched relative to it (``max_shift`` bounds the shift, e.g. to a georeferencing error).

    Args:
        optical, sar: prepared images (working resolution; results in original px).
        conf: overrides of :data:`DEFAULT_CONF`.
        prior: 3x3 ORIGINAL optical px -> SAR px transform known beforehand (e.g. from georeferencing): the SAR
            is resampled through it onto the optical grid and the search runs relative to it.
        learned: learned dense channels of an image, stacked onto the oriented gradients (``None``: gradients only,
            the classical search).

    Returns:
        up to ``top_k`` distinct hypotheses, best correlation first (empty when nothing overlaps enough).
    """
    return pooled_search(optical, sar, conf, prior, [learned])


def pooled_search(optical: PreparedImage, sar: PreparedImage, conf: dict[str, Any] | None = None,
                  prior: np.ndarray | None = None, channel_sets: Sequence[LearnedFeatures | None] = (None,)
                  ) -> list[Hypothesis]:
    """The hypotheses of :func:`global_search` with each of ``channel_sets`` in turn (``None``: the classical
    search), concatenated in that order (what ``search.learned = "both-trained"`` pools).

    The searches share the coarse level: one canvas per (rotation, scale) cell carries the oriented gradients
    and every learned channel, transformed once, and the correlation of each search is summed from the channel
    groups it uses (the masked correlation is a sum over channels). The hypotheses are those of separate
    searches, to float rounding; the pooled coarse stage costs about as much as the widest search alone.
    """
    if prior is not None:
        hyps = pooled_search(optical, through_prior(sar, optical, prior), conf, None, channel_sets)
        for h in hyps:
            h.matrix = np.asarray(prior, float) @ h.matrix
        return hyps
    c = check_conf(conf or {})
    prior_scale = prior_scale_of(optical, sar)
    learned = list({id(f): f for f in channel_sets if f is not None}.values())  # each learned map computed once
    maps = [(f(optical), f(sar)) for f in learned]
    uses = [None if f is None else next(i for i, g in enumerate(learned) if g is f) for f in channel_sets]
    sets = [[0] if u is None else [0, u + 1] for u in uses]  # channel groups: 0 the gradients, u + 1 maps[u]
    peak_lists = _coarse_peaks(optical, sar, c, prior_scale, maps, sets)
    if not any(peak_lists):
        return []
    fines = [Fine(optical, c, None if u is None else maps[u][0]) for u in uses]
    base = shared_base(_sar_level(sar, c["size"]), maps)
    polished = polish_all(fines, base, channel_indices(c["orientations"], maps, uses), peak_lists, c, prior_scale)
    return [h for f, hyps in zip(channel_sets, polished) for h in _kept(optical, sar, c, hyps, f)]


def _kept(optical: PreparedImage, sar: PreparedImage, c: dict[str, Any], hyps: list[Hypothesis],
          learned: LearnedFeatures | None) -> list[Hypothesis]:
    """One search's polished hypotheses within ``max_shift``, best first, up to ``top_k`` distinct ones, named after
    the search's ``learned`` channels."""
    if c["max_shift"] is not None:
        hyps = [h for h in hyps if centre_shift(h.matrix, optical, sar) <= c["max_shift"] * max(sar.original_size)]
    hyps.sort(key=lambda h: -h.score)
    for h in hyps:
        h.source = search_source(None if learned is None else getattr(learned, "name", "learned"))
    return _distinct(hyps, optical, c["top_k"])


def search_source(learned: str | None) -> str:
    """The ``source`` of a search's hypotheses: ``"area"`` for the classical search, ``"area+<learned>"`` for the
    search with the learned channels named ``learned`` (their ``name`` attribute, e.g. ``"aliked"``)."""
    return f"area+{learned}" if learned else "area"


def through_prior(sar: PreparedImage, optical: PreparedImage, prior: np.ndarray) -> PreparedImage:
    """The SAR image resampled through ``prior`` (ORIGINAL optical px -> SAR px) onto the optical working grid; its
    original pixels are the optical image's."""
    work = working_transform(prior, optical, sar)
    h, w = optical.image.shape[:2]
    flags = cv2.WARP_INVERSE_MAP
    image = cv2.warpPerspective(sar.image, work, (w, h), flags=cv2.INTER_LINEAR | flags)
    valid = cv2.warpPerspective(sar.valid.astype(np.uint8), work, (w, h), flags=cv2.INTER_NEAREST | flags)
    return PreparedImage(image, valid.astype(bool), optical.scale, optical.original_size, "sar", None)


def centre_shift(matrix: np.ndarray, optical: PreparedImage, sar: PreparedImage) -> float:
    """How far (original SAR px) ``matrix`` puts the optical image's centre from the SAR image's centre (the
    position the search's prior assumes)."""
    (w0, h0), (w1, h1) = optical.original_size, sar.original_size
    p = apply_transform(matrix, np.array([[(w0 - 1) / 2, (h0 - 1) / 2]]))[0]
    return float(np.hypot(p[0] - (w1 - 1) / 2, p[1] - (h1 - 1) / 2))


def prior_scale_of(optical: PreparedImage, sar: PreparedImage) -> float:
    """SAR level px per optical level px expected before the search: 1 for the same footprint, else the
    pixel-size ratio corrected for the different reductions of the two images."""
    ratio = pixel_size_ratio(optical, sar)
    if ratio is None:
        return 1.0
    # both images are reduced to the same long side, so level px = original px * (long side / original long side)
    return ratio * max(sar.original_size) / max(optical.original_size)


def _coarse_peaks(optical: PreparedImage, sar: PreparedImage, c: dict[str, Any], prior_scale: float,
                  maps: Sequence[tuple[np.ndarray, np.ndarray]] = (), sets: Sequence[Sequence[int]] = ((0,),)
                  ) -> list[list[Peak]]:
    """Best correlation peaks over the whole rotation x scale grid at the coarse level, for each search: ``maps``
    are the learned channels (optical, SAR) of every search that uses some, ``sets`` the channel groups each
    search correlates (0: the oriented gradients, ``i``: ``maps[i - 1]``). Per search, the peaks are distinct in
    transform, best first; ``polished_peaks`` of them (at least ``top_k``) go on to polishing."""
    fixed = make_level(optical, c["coarse_size"], c["sigma"], c["orientations"], learned=stack_learned(maps, 0))
    if not fixed.mask.any():
        return [[] for _ in sets]
    base = _sar_level(sar, c["coarse_size"], stack_learned(maps, 1))
    grid = [(float(a), float(s)) for s in search_scales(c) for a in search_angles(c)]
    bounds = np.cumsum([0, c["orientations"], *(m[0].shape[-1] for m in maps)])
    groups = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    correlator = Correlator(fixed, _canvas_bound(base, grid, prior_scale), c["min_overlap"], groups=groups)
    exclusion = max(3, max(fixed.mask.shape) // 16)

    def cell(angle_scale: tuple[float, float]) -> list[list[Peak]]:
        angle, scale = angle_scale
        canvas = canvas_of(base, angle, scale * prior_scale, c)
        found = []
        for ncc in correlator.ncc_sets(canvas, sets, workers=1):
            ncc = _limit_shift(ncc, fixed, canvas, c["max_shift"])
            found.append([Peak(score, angle, scale, peak_matrix(fixed, canvas, dx, dy))
                          for score, dx, dy in _top_peaks(ncc, c["peaks_per_cell"], fixed.mask.shape, exclusion)])
        return found

    with ThreadPoolExecutor(fft_workers()) as pool:  # cells side by side (FFTs and OpenCV release the GIL)
        per_cell = list(pool.map(cell, grid))
    out = []
    for k in range(len(sets)):
        peaks = sorted((p for found in per_cell for p in found[k]), key=lambda p: -p.score)
        out.append(_distinct(peaks, optical, max(c["polished_peaks"], c["top_k"])))
    return out


def _sar_level(sar: PreparedImage, size: int, learned: np.ndarray | None = None) -> Level:
    """The reduced SAR image (nodata filled; the canvas masks and computes features after warping)."""
    return make_level(sar, size, 1.0, 1, margin=0, features=False, learned=learned)


def _canvas_bound(base: Level, grid: Sequence[tuple[float, float]], prior_scale: float) -> tuple[int, int]:
    """The smallest shape ``(height, width)`` that holds the canvas of every (rotation, scale) cell of ``grid`` (the
    FFTs are no larger than the searched rotations and scales need)."""
    shapes = [canvas_shape(base.gray.shape, angle, scale * prior_scale) for angle, scale in grid]
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def _limit_shift(ncc: np.ndarray, fixed: Level, canvas: Level, max_shift: float | None) -> np.ndarray:
    """Keep only shifts within ``max_shift`` x the optical size of the centred position (the prior)."""
    if max_shift is None:
        return ncc
    h0, w0 = fixed.mask.shape
    hc, wc = canvas.mask.shape
    cx, cy = (wc - 1) / 2 - (w0 - 1) / 2, (hc - 1) / 2 - (h0 - 1) / 2
    yy, xx = np.ogrid[: ncc.shape[0], : ncc.shape[1]]
    d = np.hypot(xx - (w0 - 1) - cx, yy - (h0 - 1) - cy)
    return np.where(d <= max_shift * max(h0, w0), ncc, -1.0)


def _top_peaks(ncc: np.ndarray, count: int, fixed_shape: tuple[int, int], exclusion: int
               ) -> list[tuple[float, float, float]]:
    """Up to ``count`` peaks ``(score, dx, dy)`` of a correlation map, each ``exclusion`` px from the others."""
    work = ncc.copy()
    out = []
    for _ in range(count):
        iy, ix = np.unravel_index(int(np.argmax(work)), work.shape)
        score = float(work[iy, ix])
        if score <= -1.0 + 1e-6:
            break
        out.append((score, float(ix - (fixed_shape[1] - 1)), float(iy - (fixed_shape[0] - 1))))
        work[max(0, iy - exclusion): iy + exclusion + 1, max(0, ix - exclusion): ix + exclusion + 1] = -1.0
    return out


def _distinct(items: Sequence[Any], optical: PreparedImage, count: int, fraction: float = 0.04) -> list[Any]:
    """The first ``count`` items (peaks or hypotheses, best first) whose transforms differ from every kept one
    by more than ``fraction`` of the optical size (mean corner distance, original px)."""
    size = optical.original_size
    limit = fraction * max(size)
    kept: list[Any] = []
    for item in items:
        if all(corner_error(item.matrix, k.matrix, size).mean() > limit for k in kept):
            kept.append(item)
        if len(kept) == count:
            break
    return kept
