"""The fine level of the area search (:mod:`promptmid.search`): the coarse correlation peaks polished into
transform hypotheses.

Each coarse peak (:class:`Peak`: a rotation x scale cell and the shift of its correlation peak) is polished on a
3 x 3 grid of (rotation, scale) at half the coarse steps around it, with shifts within a few px of where the coarse
peak predicts and sub-pixel peaks; the best cell gives the peak's :class:`Hypothesis`. Each cell is warped once for
every peak of every search that tries it (:func:`polish_all`).

Coordinates: (x, y) pixels, pixel centres at integers, origin top-left; every ``matrix`` maps ORIGINAL optical pixels
to ORIGINAL SAR pixels, like every transform in promptmid.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from promptmid.correlation import Correlator, fft_workers
from promptmid.dense import parabolic_offset
from promptmid.geometry import translation
from promptmid.io import PreparedImage
from promptmid.search_levels import Level, canvas_of, make_level, resized


@dataclass
class Hypothesis:
    """One transform proposed by the area search.

    Attributes:
        matrix: 3x3 ORIGINAL optical px -> ORIGINAL SAR px.
        score: masked normalised cross-correlation at the peak (fine level; -1..1).
        distinctness: ``score`` minus the best correlation more than 2 px from the peak within the polishing window.
        angle_deg: rotation of the SAR content relative to the optical image (counter-clockwise as displayed).
        scale: SAR reduced px per optical reduced px, relative to the prior scale.
        source: what proposed it: ``"area"`` (the classical search) or ``"area+<name>"`` (the search with learned
            channels, e.g. ``"area+aliked"``).
    """

    matrix: np.ndarray
    score: float
    distinctness: float = 0.0
    angle_deg: float = 0.0
    scale: float = 1.0
    source: str = "area"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "transform": np.asarray(self.matrix).tolist(), "score": round(self.score, 4),
                "distinctness": round(self.distinctness, 4), "angle_deg": round(self.angle_deg, 3),
                "scale": round(self.scale, 4)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Hypothesis":
        return cls(np.asarray(d["transform"], float), float(d["score"]), float(d.get("distinctness", 0.0)),
                   float(d.get("angle_deg", 0.0)), float(d.get("scale", 1.0)), str(d.get("source", "area")))


@dataclass
class Peak:
    """A correlation peak: its score, the (rotation, scale) cell, and the transform it implies (original px)."""

    score: float
    angle: float
    scale: float
    matrix: np.ndarray


def peak_matrix(fixed: Level, canvas: Level, dx: float, dy: float) -> np.ndarray:
    """Original optical px -> original SAR px when optical level px ``x`` sits on canvas px ``x + d``."""
    m = canvas.to_original @ translation(dx, dy) @ np.linalg.inv(fixed.to_original)
    return m / m[2, 2]


def _predicted_shift(matrix: np.ndarray, fixed: Level, canvas: Level) -> tuple[float, float]:
    """The shift ``d`` at which a canvas best reproduces ``matrix`` at the optical level's centre."""
    h, w = fixed.mask.shape
    centre = np.array([(w - 1) / 2, (h - 1) / 2, 1.0])
    p0 = fixed.to_original @ centre
    u = np.linalg.inv(canvas.to_original) @ (matrix @ p0)
    return float(u[0] / u[2] - centre[0]), float(u[1] / u[2] - centre[1])


class Fine:
    """The fine level of one search, shared by the polishing of its peaks: the optical level (with that search's
    learned channels), its local correlator (shifts within ``radius`` of a predicted position) and the window
    (width, height) cut from each canvas."""

    def __init__(self, optical: PreparedImage, c: dict[str, Any], learned: np.ndarray | None = None) -> None:
        self.conf = fine_conf(c)
        self.fixed = make_level(optical, c["size"], self.conf["sigma"], c["orientations"], learned=learned)
        self.radius = int(round(2 * c["size"] / c["coarse_size"])) + 2
        h0, w0 = self.fixed.mask.shape
        self.window = (w0 + 2 * self.radius + 1, h0 + 2 * self.radius + 1)
        self.correlator = Correlator(self.fixed, self.window[::-1], c["min_overlap"], local=True)


def fine_conf(c: dict[str, Any]) -> dict[str, Any]:
    """The search options of the fine level: the smoothing 1.5 times the coarse one."""
    return {**c, "sigma": c["sigma"] * 1.5}


# the polishing grid around a coarse peak: (rotation, log-scale) offsets in coarse steps, in the order tried
POLISH_OFFSETS = tuple((da, ds) for da in (-0.5, 0.0, 0.5) for ds in (-0.5, 0.0, 0.5))


def shared_base(base: Level, maps: Sequence[tuple[np.ndarray, np.ndarray]]) -> Level:
    """The reduced SAR image ``base`` (no learned channels) given the learned channels of every map (SAR side), each
    resized straight to the level, so that a search's channels of a canvas made from it equal those of a canvas made
    for that search alone."""
    if maps:
        shape = (base.gray.shape[1], base.gray.shape[0])
        base.learned = np.concatenate([resized(m[1], shape) for m in maps], axis=-1)
    return base


def channel_indices(orientations: int, maps: Sequence[tuple[np.ndarray, np.ndarray]], uses: Sequence[int | None]
                     ) -> list[np.ndarray]:
    """For each search, the channels of a canvas of :func:`shared_base` that it correlates: the oriented gradients,
    then the channels of the learned map it uses (``uses[k]``: index into ``maps``; ``None``: gradients only)."""
    bounds = orientations + np.cumsum([0, *(m[1].shape[-1] for m in maps)])
    return [np.r_[0:orientations] if u is None else np.r_[0:orientations, bounds[u]:bounds[u + 1]] for u in uses]


def polish_all(fines: Sequence[Fine], base: Level, channels: Sequence[np.ndarray], peak_lists: Sequence[list[Peak]],
                c: dict[str, Any], prior_scale: float) -> list[list[Hypothesis]]:
    """Refine every search's coarse peaks at the fine level: for each peak a 3 x 3 grid of (rotation, scale) at half
    the coarse steps around it (:data:`POLISH_OFFSETS`), shifts within a few px of where the coarse peak predicts,
    sub-pixel; the best cell (the first on ties) gives the peak's hypothesis.

    Every (rotation, scale) cell is warped once, with the channels of every search (``base``, ``channels[k]`` the
    ones search ``k`` correlates), for all the peaks of all the searches that try it: neighbouring peaks and the two
    searches' peaks often share cells. Cells are processed side by side (FFTs and OpenCV release the GIL).

    Returns:
        per search, the hypotheses of its peaks that found a correlation (peak order).
    """
    step = _log_step(c)
    cells: dict[tuple[float, float], tuple[float, float, list[tuple[int, int, int]]]] = {}
    for k, peaks in enumerate(peak_lists):
        for j, peak in enumerate(peaks):
            for n, (da, ds) in enumerate(POLISH_OFFSETS):
                angle, scale = peak.angle + da * c["rotation_step"], peak.scale * math.exp(ds * step)
                cells.setdefault((round(angle, 9), round(scale, 12)), (angle, scale, []))[2].append((k, j, n))
    conf = fine_conf(c)

    def cell(item: tuple[float, float, list[tuple[int, int, int]]]) -> list[tuple[tuple[int, int, int], Any]]:
        angle, scale, users = item
        canvas = canvas_of(base, angle, scale * prior_scale, conf)
        return [((k, j, n), _cell_peak(fines[k], canvas, channels[k], peak_lists[k][j], angle, scale))
                for k, j, n in users]

    with ThreadPoolExecutor(fft_workers()) as pool:
        found = dict(pair for out in pool.map(cell, cells.values()) for pair in out)
    result = []
    for k, peaks in enumerate(peak_lists):
        hyps = []
        for j in range(len(peaks)):
            tried = [h for n in range(len(POLISH_OFFSETS)) if (h := found[(k, j, n)]) is not None]
            if tried:
                hyps.append(max(tried, key=lambda h: h.score))  # max keeps the first of equal scores
        result.append(hyps)
    return result


def _cell_peak(fine: Fine, canvas: Level, channels: np.ndarray, peak: Peak, angle: float, scale: float
               ) -> Hypothesis | None:
    """The best sub-pixel correlation of the ``channels`` of ``canvas`` (the SAR level at ``angle``, ``scale``) within
    ``fine.radius`` px of the shift the coarse ``peak`` predicts; ``None`` when nothing overlaps enough."""
    dx, dy = _predicted_shift(peak.matrix, fine.fixed, canvas)
    x0, y0 = int(round(dx)) - fine.radius, int(round(dy)) - fine.radius
    window = _crop(canvas, x0, y0, *fine.window, channels=channels)
    found = _local_peak(fine.correlator.ncc(window, workers=1), fine.correlator.origin, (dx - x0, dy - y0),
                        fine.radius)
    if found is None:
        return None
    score, distinct, fx, fy = found
    return Hypothesis(peak_matrix(fine.fixed, window, fx, fy), score, distinct, angle, scale)


def _crop(level: Level, x0: int, y0: int, width: int, height: int, channels: np.ndarray) -> Level:
    """The part ``[y0:y0+height, x0:x0+width]`` of a canvas (zero features, masked, outside it), with only the
    feature ``channels`` (indices) given."""
    h, w = level.mask.shape
    feats = np.zeros((len(channels), height, width), np.float32)
    mask = np.zeros((height, width), bool)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y0 + height, h), max(x0, 0), min(x0 + width, w)
    if sy0 < sy1 and sx0 < sx1:
        feats[:, sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = level.features[channels, sy0:sy1, sx0:sx1]
        mask[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = level.mask[sy0:sy1, sx0:sx1]
    out = Level(np.zeros((height, width), np.float32), mask, level.to_original @ translation(x0, y0))
    out.features = feats
    return out


def _log_step(c: dict[str, Any]) -> float:
    """Coarse scale step (natural log)."""
    return math.log(c["scale_range"][1] / c["scale_range"][0]) / max(c["scale_steps"] - 1, 1)


def _local_peak(ncc: np.ndarray, origin: tuple[int, int], predicted: tuple[float, float], radius: int
                ) -> tuple[float, float, float, float] | None:
    """Best correlation within ``radius`` px of the ``predicted`` shift, sub-pixel: ``(score, distinctness, dx,
    dy)``; distinctness = the peak minus the best score more than 2 px away in the map (``origin``: the map index
    of shift 0, (y, x))."""
    cx, cy = int(round(predicted[0])) + origin[1], int(round(predicted[1])) + origin[0]
    y0, y1 = max(cy - radius, 0), min(cy + radius + 1, ncc.shape[0])
    x0, x1 = max(cx - radius, 0), min(cx + radius + 1, ncc.shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    window = ncc[y0:y1, x0:x1]
    iy, ix = np.unravel_index(int(np.argmax(window)), window.shape)
    iy, ix = iy + y0, ix + x0
    score = float(ncc[iy, ix])
    if score <= -1.0 + 1e-6:
        return None
    far = ncc.copy()
    far[max(0, iy - 2): iy + 3, max(0, ix - 2): ix + 3] = -1.0
    dx = ix + _parabola(ncc, iy, ix, axis=1) - origin[1]
    dy = iy + _parabola(ncc, iy, ix, axis=0) - origin[0]
    return score, score - float(far.max()), dx, dy


def _parabola(m: np.ndarray, iy: int, ix: int, axis: int) -> float:
    """Sub-pixel offset of a peak along one axis (:func:`promptmid.refine.parabolic_offset`; 0 at the border or
    next to a masked shift)."""
    if axis == 1 and 0 < ix < m.shape[1] - 1:
        a, b, c = m[iy, ix - 1], m[iy, ix], m[iy, ix + 1]
    elif axis == 0 and 0 < iy < m.shape[0] - 1:
        a, b, c = m[iy - 1, ix], m[iy, ix], m[iy + 1, ix]
    else:
        return 0.0
    return 0.0 if min(a, c) <= -1 else parabolic_offset(a, b, c)
