"""The images of the area search (:mod:`promptmid.search`) reduced to levels: gray values, the mask of pixels that
may correlate, the correlated channels (oriented gradients, plus learned channels when given) zero-mean inside the
mask, and the SAR level rotated and scaled onto canvases.

Coordinates: (x, y) pixels, pixel centres at integers; ``Level.to_original`` maps level px to ORIGINAL image px.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import cv2
import numpy as np

from promptmid.dense import gray, oriented_gradient_features
from promptmid.io.radiometry import fill_nodata

if TYPE_CHECKING:
    from promptmid.io import PreparedImage


@dataclass
class Level:
    """One image reduced for the search: gray values, the usable mask, and the map back to original px."""

    gray: np.ndarray
    mask: np.ndarray
    to_original: np.ndarray  # 3x3: level px -> original px
    features: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    learned: np.ndarray | None = field(default=None, repr=False)  # [h, w, C] learned channels at this level's size



def make_level(image: PreparedImage, long_side: int, sigma: float, orientations: int, margin: int = 2,
               features: bool = True, learned: np.ndarray | None = None) -> Level:
    """Reduce a prepared image to ``long_side`` px, fill nodata from its neighbourhood, compute the
    oriented-gradient features and the mask of pixels that may correlate (valid, small holes closed, eroded
    by ``margin`` + the smoothing so the footprint edge and nodata borders never count). ``learned``: the image's
    learned channels ``[h', w', C]`` (any size), reduced to the level and stacked onto the features."""
    h, w = image.image.shape[:2]
    f = min(1.0, long_side / max(h, w))
    size = (max(int(round(w * f)), 8), max(int(round(h * f)), 8))
    valid = image.valid.astype(np.float32)
    filled = fill_nodata(gray(image.image), valid)
    small = cv2.resize(filled, size, interpolation=cv2.INTER_AREA)
    small_valid = cv2.resize(valid, size, interpolation=cv2.INTER_AREA) > 0.5
    mask = _usable(small_valid, margin + int(math.ceil(2 * sigma)))
    sx, sy = w / size[0], h / size[1]
    to_work = np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])
    level = Level(small, mask, image.scale_matrix() @ to_work)
    if learned is not None:
        level.learned = resized(learned, size)
    if features:
        level.features = _zero_mean(_channels(oriented_gradient_features(small, orientations, sigma), level.learned),
                                    mask)
    return level


def resized(channels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[h, w, C]`` channels area-resized to ``size`` = (width, height)."""
    return per_four_channels(lambda part: cv2.resize(part, size, interpolation=cv2.INTER_AREA), channels)


def per_four_channels(op: Callable[[np.ndarray], np.ndarray], channels: np.ndarray) -> np.ndarray:
    """``op`` (an OpenCV resize or warp of a ``[h, w, <=4]`` image) applied to ``[h, w, C]`` channels four at a time
    (OpenCV handles at most 4 channels at once for most operations); the results concatenated to ``[H, W, C]``."""
    parts = [op(np.ascontiguousarray(channels[..., i:i + 4])) for i in range(0, channels.shape[-1], 4)]
    return np.concatenate([q.reshape(q.shape[0], q.shape[1], -1) for q in parts], axis=-1)


def stack_learned(maps: Sequence[tuple[np.ndarray, np.ndarray]], which: int) -> np.ndarray | None:
    """The learned channels of several maps (``maps[i][which]``, ``[h, w, C_i]``) stacked along the channels, each
    area-resized to the first one's size; ``None`` without maps."""
    if not maps:
        return None
    first = maps[0][which]
    size = (first.shape[1], first.shape[0])
    return np.concatenate([first] + [resized(m[which], size) for m in maps[1:]], axis=-1)


def _channels(gradients: np.ndarray, learned: np.ndarray | None) -> np.ndarray:
    """The correlated channels ``[C, H, W]``: the oriented gradients, then the learned channels if any."""
    return gradients if learned is None else np.concatenate([gradients, learned.transpose(2, 0, 1)])


def _usable(valid: np.ndarray, margin: int) -> np.ndarray:
    """Valid pixels with holes of a few px closed (filled by :func:`promptmid.io.fill_nodata`), eroded by ``margin`` px."""
    v = cv2.morphologyEx(valid.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    kernel = np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)
    return cv2.erode(v, kernel, borderValue=0).astype(bool)


def _zero_mean(feat: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Channels with their mean over ``mask`` removed and zero outside it (what the masked correlation needs)."""
    m = mask.astype(np.float32)
    count = float(m.sum())
    if count == 0:
        return np.zeros_like(feat)
    mean = np.tensordot(feat, m, axes=([1, 2], [0, 1])) / count
    return np.ascontiguousarray((feat - mean[:, None, None]) * m, np.float32)


def _canvas_linear(angle_deg: float, scale: float) -> np.ndarray:
    """2x2: canvas offset -> SAR level offset for a SAR content rotated by ``angle_deg`` and scaled by ``scale``."""
    a = np.deg2rad(angle_deg)
    return scale * np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])


def canvas_shape(shape: tuple[int, int], angle_deg: float, scale: float) -> tuple[int, int]:
    """``(height, width)`` of the canvas :func:`canvas_of` makes of a SAR level of ``shape`` (height, width)."""
    ext = np.abs(np.linalg.inv(_canvas_linear(angle_deg, scale))) @ np.array([shape[1], shape[0]], float)
    return int(math.ceil(ext[1])) + 2, int(math.ceil(ext[0])) + 2


def canvas_of(base: Level, angle_deg: float, scale: float, conf: dict[str, Any]) -> Level:
    """The reduced SAR image ``base`` rotated by ``-angle_deg`` and scaled by ``1/scale`` onto a canvas that holds
    all of it, so that a pure translation remains between the canvas and the optical level when the SAR content
    is rotated by ``angle_deg`` and scaled by ``scale`` relative to the optical image.

    ``Level.to_original`` of the canvas maps canvas px to ORIGINAL SAR px.
    """
    h, w = base.gray.shape
    lin = _canvas_linear(angle_deg, scale)
    ch, cw = canvas_shape((h, w), angle_deg, scale)
    to_sar = np.eye(3)
    to_sar[:2, :2] = lin
    to_sar[:2, 2] = np.array([(w - 1) / 2, (h - 1) / 2]) - lin @ np.array([(cw - 1) / 2, (ch - 1) / 2])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    gray = cv2.warpAffine(base.gray, to_sar[:2], (cw, ch), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    valid = cv2.warpAffine(base.mask.astype(np.uint8), to_sar[:2], (cw, ch), flags=cv2.INTER_NEAREST
                           | cv2.WARP_INVERSE_MAP, borderValue=0)
    margin = int(math.ceil(2 * conf["sigma"])) + 1
    mask = cv2.erode(valid, np.ones((2 * margin + 1,) * 2, np.uint8), borderValue=0).astype(bool)
    canvas = Level(gray, mask, base.to_original @ to_sar)
    learned = None if base.learned is None else cv2.warpAffine(
        base.learned, to_sar[:2], (cw, ch), flags=flags, borderMode=cv2.BORDER_REPLICATE).reshape(ch, cw, -1)
    canvas.features = _zero_mean(_channels(oriented_gradient_features(gray, conf["orientations"], conf["sigma"]),
                                           learned), mask)
    return canvas
