"""Preparing images for the models: :func:`load_image` -> :class:`PreparedImage` (3-channel float32 in ``[0, 1]`` at
working resolution, a validity mask, the scale back to the original grid), and rotated copies for the rotation
search.

A working-resolution point ``p`` maps to the original image as ``(p + 0.5) * scale - 0.5`` (pixel centres at
integers in both grids).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import cv2
import numpy as np

from promptmid.errors import InputError
from promptmid.geometry import Size
from promptmid.io.bands import BandChoice, choose_bands
from promptmid.io.radiometry import border_fill_mask, fill_holes, optical_to_unit, sar_scale_of, sar_to_unit
from promptmid.io.raster import MIN_SIDE, Modality, RasterImage, as_raster, check_raster

if TYPE_CHECKING:
    import torch


@dataclass
class PreparedImage:
    """An image ready for the models.

    Attributes:
        image: ``[h, w, 3]`` float32 in ``[0, 1]`` at working resolution.
        valid: ``[h, w]`` bool, False on nodata / fill pixels.
        scale: ``(sx, sy)``: original pixels per working pixel.
        original_size: :class:`~promptmid.geometry.Size` ``(W, H)`` of the original image.
        modality: ``"optical"`` or ``"sar"``.
        raster: the raw image it came from.
        notes: what was done to the input that a user should know (e.g. complex SAR taken as amplitude).
        sar_scaling: the radiometric scaling applied to a SAR image (``"log"``, ``"linear"``, ``"db"``: what
            ``auto`` resolved to), ``None`` for optical images.
        bands: the :class:`BandChoice` (which file bands the models saw, and why).
    """

    image: np.ndarray
    valid: np.ndarray
    scale: tuple[float, float]
    original_size: Size
    modality: Modality
    raster: RasterImage = field(repr=False)
    notes: tuple[str, ...] = ()
    sar_scaling: str | None = None
    bands: BandChoice | None = None

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Map ``[N, 2]`` working-resolution (x, y) to original pixel coordinates."""
        return to_original(points, self.scale)

    def scale_matrix(self) -> np.ndarray:
        """3x3 matrix mapping working-resolution pixels to original pixels."""
        sx, sy = self.scale
        return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def to_original(points: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Map ``[N, 2]`` working-resolution (x, y) to original pixels for ``scale = (sx, sy)`` (original px per
    working px; pixel centres at integers in both)."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * np.asarray(scale, dtype=np.float64) - 0.5


def load_image(
    source: str | Path | np.ndarray | RasterImage,
    modality: Modality,
    max_side: int | None = 1024,
    sar_scale: str = "auto",
    nan_as_nodata: bool = False,
    detect_fill: bool = True,
    sar_smooth: float = 0.0,
    optical_bands: str | Sequence[int] | None = None,
    sar_bands: str | Sequence[int] | None = None,
) -> PreparedImage:
    """Read and prepare an optical or SAR image for description.

    Args:
        source: path, array (``[H, W]`` or ``[H, W, C]``) or raster.
        modality: ``"optical"`` or ``"sar"``.
        max_side: downscale so that the long side is at most this (px); ``None`` keeps size.
        sar_scale: SAR radiometric scaling, see :func:`sar_to_unit`.
        nan_as_nodata: also mask NaN/inf pixels of an OPTICAL image instead of refusing it (NaN/inf in a SAR
            image, e.g. the border of a dB product, are always nodata).
        detect_fill: mask exact-zero fill connected to the border (rotation corners).
        sar_smooth: Gaussian sigma (px) applied to the log-scaled SAR to damp speckle; 0 = off.
        optical_bands, sar_bands: 1-based band numbers (``"4,3,2"``) for the image of that modality; ``None``
            chooses automatically (:func:`choose_bands`).

    Raises:
        InputError: for any unusable input (see :func:`check_raster`, :func:`choose_bands`).
    """
    raster = as_raster(source, max_side)
    notes: tuple[str, ...] = ()
    if np.iscomplexobj(raster.data):  # SLC: complex samples; the amplitude is what the models can use
        if modality != "sar":
            raise InputError(f"{raster.label} is complex-valued; only SAR (SLC) input may be complex.")
        notes = ("complex (SLC) SAR: the amplitude |z| of each band was used",)
        raster = dataclasses.replace(raster, data=np.abs(raster.data).astype(np.float32))
    choice = choose_bands(raster, modality, optical_bands if modality == "optical" else sar_bands)
    picked = raster.pick(choice.bands)
    alpha = raster.data[..., choice.alpha - 1] != 0 if choice.alpha else None
    valid = check_raster(picked, nan_as_nodata or modality == "sar", alpha)
    data = np.where(valid[..., None], picked.data, 0) if not valid.all() else picked.data
    if detect_fill:
        valid &= ~border_fill_mask(data[..., 0] if data.shape[-1] < 3 else data[..., :3].max(axis=-1))
        if valid.mean() < 0.02:
            raise InputError(f"{raster.label} has almost no valid pixels after masking fill/nodata.")
    scaling = sar_scale_of(data, valid, sar_scale) if modality == "sar" else None
    unit = sar_to_unit(data, valid, scaling) if modality == "sar" else optical_to_unit(data, valid)
    if modality == "sar":
        if sar_smooth > 0:
            unit = cv2.GaussianBlur(unit, (0, 0), sar_smooth)
        unit = np.repeat(unit[..., None], 3, axis=-1)
    unit[~valid] = 0.0
    # NaN/inf specks (never a pixel value) are filled; pixels equal to a nodata value such as 0 are not: in an
    # integer SAR product scattered zeros are mostly real dark pixels (filling them moved a GF3 fit by 95 px)
    if np.issubdtype(picked.data.dtype, np.floating):
        unit, valid = fill_holes(unit, valid, only=~np.isfinite(picked.data).all(axis=-1))
    return dataclasses.replace(_resize_prepared(unit, valid, raster, modality, max_side), notes=notes,
                               sar_scaling=scaling, bands=choice)


def downscale_prepared(image: PreparedImage, max_side: int | None) -> PreparedImage:
    """``image``, prepared at full resolution (``load_image(raster, ..., max_side=None)`` of an in-memory raster), at
    the working resolution of ``max_side``: the same arrays as ``load_image(raster, ..., max_side=max_side)``,
    without preparing the raster twice (``image`` itself when it already fits)."""
    if image.scale != (1.0, 1.0):
        raise ValueError(f"downscale_prepared needs a full-resolution image, got scale {image.scale}")
    out = _resize_prepared(image.image, image.valid, image.raster, image.modality, max_side)
    if out.image.shape == image.image.shape:
        return image
    return dataclasses.replace(out, notes=image.notes, sar_scaling=image.sar_scaling, bands=image.bands)


def _resize_prepared(
    unit: np.ndarray, valid: np.ndarray, raster: RasterImage, modality: Modality, max_side: int | None
) -> PreparedImage:
    w, h = raster.original_size
    dw, dh = raster.size  # the data as read (decimated for very large files)
    factor = 1.0 if max_side is None else min(1.0, max_side / max(w, h))
    if factor < 1.0 or (dw, dh) != (w, h):
        size = (max(MIN_SIDE, round(w * factor)), max(MIN_SIDE, round(h * factor)))
        unit = cv2.resize(unit, size, interpolation=cv2.INTER_AREA)
        valid = cv2.resize(valid.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    hh, ww = unit.shape[:2]
    return PreparedImage(
        image=np.ascontiguousarray(unit, dtype=np.float32),
        valid=valid,
        scale=(w / ww, h / hh),
        original_size=Size(w, h),
        modality=modality,
        raster=raster,
    )


def rotation_steps(step_deg: float) -> list[float]:
    """Angles ``0, step, 2*step, ... < 360`` (degrees)."""
    if not 0 < step_deg <= 180:
        raise ValueError(f"Rotation step must be in (0, 180] degrees, got {step_deg}")
    return [float(a) for a in np.arange(0.0, 360.0, step_deg)]


def rotate_prepared(image: PreparedImage, angle_deg: float) -> tuple[PreparedImage, np.ndarray]:
    """Rotate a prepared image counter-clockwise by ``angle_deg`` on an enlarged canvas.

    Returns:
        the rotated image and the 3x3 matrix mapping rotated-image pixels back to ``image`` pixels.
    """
    if angle_deg % 360 == 0:
        return image, np.eye(3)
    h, w = image.image.shape[:2]
    c = np.cos(np.deg2rad(angle_deg))
    s = np.sin(np.deg2rad(angle_deg))
    nw, nh = int(np.ceil(abs(w * c) + abs(h * s) - 1e-6)), int(np.ceil(abs(w * s) + abs(h * c) - 1e-6))
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle_deg, 1.0)
    m[:, 2] += [(nw - w) / 2, (nh - h) / 2]
    fwd = np.vstack([m, [0, 0, 1]])
    flags = cv2.INTER_NEAREST if angle_deg % 90 == 0 else cv2.INTER_LINEAR
    img = cv2.warpAffine(image.image, m, (nw, nh), flags=flags, borderValue=0)
    valid = cv2.warpAffine(image.valid.astype(np.uint8), m, (nw, nh), flags=cv2.INTER_NEAREST, borderValue=0)
    rotated = PreparedImage(img, valid.astype(bool), image.scale, image.original_size, image.modality, image.raster)
    return rotated, np.linalg.inv(fwd)


def image_tensor(image: "np.ndarray | PreparedImage") -> "torch.Tensor":
    """The ``[1, 3, H, W]`` float32 tensor the networks take, in [0, 1], of a prepared image or of its ``[H, W, 3]``
    array (``PreparedImage.image``); rows and columns as in the image (working resolution)."""
    import torch  # the I/O layer itself does not need torch

    array = image.image if isinstance(image, PreparedImage) else image
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None].float()
