"""Displaced evaluation: warp each pair's SAR image by a seeded random transform.

Most real optical-SAR pairs are co-registered (identity ground truth). Scored as they are, they
reward a descriptor that encodes *where* a pixel sits in the image instead of what it shows. The
perturbed protocol removes that shortcut: the SAR image of every pair is resampled by a random
transform ``T`` (original SAR px -> displaced SAR px, same canvas size, zero fill outside) and the
ground truth is composed with it, ``H' = T @ H``; check points ``(xs, ys)`` become ``T(xs, ys)``.

Kinds (:data:`KINDS`):

- ``"standard"``: rotation uniform in +-15 deg, scale log-uniform in [0.8, 1.25], shear +-0.1,
  translation up to +-15 % of the image size per axis (the headline protocol);
- ``"full-rotation"``: as standard but the rotation is uniform in [0, 360) deg (for runs that search
  SAR rotations);
- ``"shift"``: a pure translation of 8-15 % of the image size per axis with random signs, on a canvas
  grown by the shift so that no content is lost (the position-shortcut diagnostic: NCM under a shift
  over NCM aligned; 1 for a descriptor that ignores where content sits in the frame).

The draw depends only on ``(seed, pair id, kind)``, so every method of a run sees the same
displaced image, and a rerun (or another worker process) draws the same transform.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from promptmid.evaluation.manifest import Pair
from promptmid.io import RasterImage, read_raster
from promptmid.geometry import Size, affine_about_centre, apply_transform, translation, warpable

KINDS = ("standard", "full-rotation", "shift")


@dataclass(frozen=True)
class Perturbation:
    """A seeded family of random SAR displacements.

    Attributes:
        seed: base seed (combined with the pair id).
        kind: one of :data:`KINDS`.
        max_rotation: largest |rotation| of ``"standard"`` (deg).
        scale_range: (min, max) isotropic scale, drawn log-uniformly.
        max_shear: largest |shear| (x-shear factor) of ``"standard"``/``"full-rotation"``.
        max_shift: largest |translation| per axis as a fraction of the image width/height.
        min_shift: smallest |translation| per axis of ``"shift"`` (fraction of the size).
    """

    seed: int
    kind: str = "standard"
    max_rotation: float = 15.0
    scale_range: tuple[float, float] = (0.8, 1.25)
    max_shear: float = 0.1
    max_shift: float = 0.15
    min_shift: float = 0.08

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown perturbation kind {self.kind!r}; valid: {', '.join(KINDS)}")

    @property
    def tag(self) -> str:
        """Short name for cache folders and tables, e.g. ``"p0-standard"``."""
        return f"p{self.seed}-{self.kind}"

    def describe(self) -> str:
        """One line for the provenance header of a table."""
        if self.kind == "shift":
            return (f"perturbed ({self.tag}): SAR translated by {self.min_shift:.0%}-{self.max_shift:.0%} of the "
                    "image size per axis, random signs; GT composed")
        rot = "uniform 0-360 deg" if self.kind == "full-rotation" else f"+-{self.max_rotation:g} deg"
        lo, hi = self.scale_range
        return (f"perturbed ({self.tag}): SAR warped by a seeded random affine per pair (rotation {rot}, scale "
                f"{lo:g}-{hi:g}, shear +-{self.max_shear:g}, translation up to +-{self.max_shift:.0%} of the size); "
                "GT composed")

    def draw(self, pair_id: str, size: Size) -> tuple[np.ndarray, Size]:
        """The transform of one pair and the size of the displaced canvas.

        Args:
            pair_id: the pair's id (part of the seed).
            size: ``(W, H)`` of the SAR image (px).

        Returns:
            ``T`` (3x3, original SAR px -> displaced SAR px) and the canvas ``(W', H')``: the same
            size for ``"standard"``/``"full-rotation"`` (content moved off the canvas is lost, as in a real
            partially overlapping pair); for ``"shift"`` the canvas grows by the shift, so no content is
            lost and only the position of the content in the frame changes.
        """
        rng = np.random.default_rng([self.seed, zlib.crc32(f"{pair_id}|{self.kind}".encode())])
        w, h = size
        if self.kind == "shift":
            mag = rng.uniform(self.min_shift, self.max_shift, 2) * (w, h)
            sign = rng.choice([-1.0, 1.0], 2)
            # content moves right/down by mag on a positive sign (padding before it), else it stays at the
            # origin and the padding goes after it: either way its position relative to the frame changes
            t = translation(*(np.where(sign > 0, mag, 0.0)))
            return t, Size(int(round(w + mag[0])), int(round(h + mag[1])))
        angle = rng.uniform(0, 360) if self.kind == "full-rotation" else rng.uniform(-1, 1) * self.max_rotation
        scale = float(np.exp(rng.uniform(*np.log(self.scale_range))))
        shear = rng.uniform(-1, 1) * self.max_shear
        shift = rng.uniform(-1, 1, 2) * self.max_shift * (w, h)
        return affine_about_centre(size, angle, scale, shear, shift), Size(w, h)


def warp_raster(raster: RasterImage, matrix: np.ndarray, size: Size | None = None) -> RasterImage:
    """Resample ``raster`` by ``matrix`` (input px -> output px) onto a canvas of ``size = (W, H)``
    (default: the raster's size).

    Bilinear resampling, band by band, with the dtype handling of :func:`promptmid.geometry.warpable`.
    Pixels with no source are 0, which :func:`promptmid.io.load_image` masks as border fill.
    Georeferencing is dropped: the displaced image is a new, non-georeferenced image.
    """
    src, cast = warpable(raster.data)
    w, h = size or raster.size
    bands = [cast(cv2.warpPerspective(np.ascontiguousarray(src[..., c]), matrix, (w, h), flags=cv2.INTER_LINEAR,
                                      borderMode=cv2.BORDER_CONSTANT, borderValue=0)) for c in range(src.shape[-1])]
    return RasterImage(np.stack(bands, axis=-1), path=None, nodata=raster.nodata)


def perturb_pair(pair: Pair, perturbation: Perturbation | None) -> tuple[Pair, RasterImage]:
    """The displaced version of ``pair``: a pair with composed ground truth and its warped SAR raster.

    Returns:
        ``(pair', sar)`` where ``pair'.H = T @ pair.H`` and its check points' SAR side is mapped by
        ``T``; ``sar`` is the SAR raster resampled by ``T``. With ``perturbation=None`` the pair and
        the SAR as read from disk.
    """
    sar = read_raster(pair.sar)
    if perturbation is None:
        return pair, sar
    t, canvas = perturbation.draw(pair.id, sar.size)
    return compose_truth(pair, t), warp_raster(sar, t, canvas)


def compose_truth(pair: Pair, matrix: np.ndarray) -> Pair:
    """``pair`` with its SAR side moved by ``matrix`` (SAR px -> new SAR px): ``H`` and check points."""
    h = None if pair.H is None else matrix @ pair.H
    points = None
    if pair.points is not None:
        points = np.concatenate([pair.points[:, :2], apply_transform(matrix, pair.points[:, 2:])], axis=1)
    return dataclasses.replace(pair, H=h, points=points)
