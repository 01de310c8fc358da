"""Types and small helpers shared by every evaluated method (see :mod:`promptmid.evaluation.methods`)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from promptmid.io import PreparedImage, to_uint8

MethodFn = Callable[[PreparedImage, PreparedImage], dict[str, Any]]


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: registry key, e.g. ``"sift-ratio"``.
        description: one line for tables and ``--help``.
        build: ``conf -> MethodFn``; ``conf`` is ``default_conf`` merged with the caller's settings.
        default_conf: settings with their defaults (each documented where the builder lives).
        rotation_invariant: True when the method needs no rotation search.
        rotations_inside: True when the method runs the rotation search itself (``conf["rotations"]``).
        default: included when ``--methods`` is not given.
        parts: a composite of other registered methods: the matches of ``parts[0]`` and the transform hypotheses
            (``"hypotheses"`` in their output) of the others, weighed by the QC stage
            (:mod:`promptmid.evaluation.area`); empty for an ordinary method.
    """

    name: str
    description: str
    build: Callable[[dict[str, Any]], MethodFn]
    default_conf: dict[str, Any] = field(default_factory=dict)
    rotation_invariant: bool = False
    rotations_inside: bool = False
    default: bool = True
    parts: tuple[str, ...] = ()


def gray_uint8(image: PreparedImage) -> np.ndarray:
    """``[h, w]`` uint8 gray of a prepared (working-resolution) image."""
    return to_uint8(image.image.mean(axis=-1))


def in_valid(points: np.ndarray, valid: np.ndarray, margin: int = 0) -> np.ndarray:
    """``[N]`` bool: working-pixel ``points [N, 2]`` fall on valid pixels (eroded by ``margin``)."""
    import cv2

    mask = valid.astype(np.uint8)
    if margin > 0:
        mask = cv2.erode(mask, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8), borderValue=1)
    xi = np.clip(np.round(points[:, 0]).astype(int), 0, valid.shape[1] - 1)
    yi = np.clip(np.round(points[:, 1]).astype(int), 0, valid.shape[0] - 1)
    return mask[yi, xi].astype(bool)


def output(optical: PreparedImage, sar: PreparedImage, k0: np.ndarray, k1: np.ndarray, scores: np.ndarray,
           timings: dict[str, float]) -> dict[str, Any]:
    """A method's output dict from working-resolution matches ``k0, k1 [K, 2]``."""
    k0 = np.asarray(k0, np.float64).reshape(-1, 2)
    k1 = np.asarray(k1, np.float64).reshape(-1, 2)
    return {"points0": optical.to_original(k0), "points1": sar.to_original(k1),
            "scores": np.asarray(scores, np.float32).reshape(-1), "timings": dict(timings)}


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds spent in the block to ``timings[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
