"""Geometry kernel: 3x3 plane transforms, their application, comparison and image warps. Ground floor:
numpy and OpenCV only, no other promptmid module.

Conventions: point arrays are ``[N, 2]`` (x, y) pixels, x = column, y = row, pixel centres at
integers, origin top-left. A 3x3 ``matrix`` maps image-0 pixels to image-1 pixels,
``[x1, y1, 1]^T ~ M [x0, y0, 1]^T``; for a registration, image 0 is the optical image and
image 1 the SAR image.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import cv2
import numpy as np


class Size(NamedTuple):
    """An image size in pixels, everywhere in promptmid as ``(width, height)`` = (columns, rows)."""

    width: int
    height: int

    @classmethod
    def of(cls, image: Any) -> "Size":
        """The size of an ``[H, W, ...]`` array or a ``[..., H, W]`` tensor (``channels_first`` torch layout)."""
        if hasattr(image, "dim"):  # torch tensor: [..., H, W]
            return cls(int(image.shape[-1]), int(image.shape[-2]))
        return cls(int(image.shape[1]), int(image.shape[0]))

    @property
    def hw(self) -> tuple[int, int]:
        """``(height, width)``, for APIs that want rows first (numpy shapes, torch ``interpolate``)."""
        return self.height, self.width


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 transform to ``[N, 2]`` points (perspective division included)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    homog = np.concatenate([pts, np.ones((len(pts), 1))], axis=1) @ np.asarray(matrix, dtype=np.float64).T
    return homog[:, :2] / homog[:, 2:3]


def residuals(matrix: np.ndarray, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
    """Euclidean reprojection errors ``|M(p0) - p1|`` in image-1 pixels."""
    return np.linalg.norm(apply_transform(matrix, points0) - np.asarray(points1, dtype=np.float64), axis=1)


def corners(size: Size) -> np.ndarray:
    """``[4, 2]`` corner pixel centres of an image of ``size = (W, H)``, clockwise from top-left."""
    w, h = size
    return np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], float)


def corner_error(estimated: np.ndarray, truth: np.ndarray, size: Size) -> np.ndarray:
    """``[4]`` distances (image-1 px) between the image-0 corners mapped by ``estimated`` and by ``truth``.

    ``size = (W, H)`` of image 0 (the optical image).
    """
    c = corners(size)
    return np.linalg.norm(apply_transform(estimated, c) - apply_transform(truth, c), axis=1)


def translation(tx: float, ty: float) -> np.ndarray:
    """3x3 translation by ``(tx, ty)`` px."""
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def affine_about_centre(size: Size, angle_deg: float, scale: float, shear: float = 0.0,
                        shift: np.ndarray | tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """3x3 affine: shear, scale and rotate (counter-clockwise on screen) about the image centre, then shift.

    Args:
        size: ``(W, H)`` px; the centre is ``((W-1)/2, (H-1)/2)`` (pixel centres at integers).
        angle_deg: rotation; positive turns the content counter-clockwise as displayed (y down).
        scale: isotropic scale factor.
        shear: x-shear factor (``x += shear * y`` before rotation).
        shift: translation ``(tx, ty)`` px applied last.
    """
    cx, cy = (size[0] - 1) / 2.0, (size[1] - 1) / 2.0
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), np.sin(a), 0.0], [-np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    lin = rot @ np.diag([scale, scale, 1.0]) @ np.array([[1.0, shear, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    return translation(cx + shift[0], cy + shift[1]) @ lin @ translation(-cx, -cy)


def format_matrix(matrix: np.ndarray | list | None, indent: str = "") -> str:
    """A 3x3 transform as aligned text rows (``"(none)"`` for a failed fit)."""
    if matrix is None:
        return "(none)"
    return "\n".join(indent + " ".join(f"{v:10.4f}" for v in row) for row in np.asarray(matrix))


def warp_to_optical(image: np.ndarray, matrix: np.ndarray, optical_size: Size,
                    interpolation: int = cv2.INTER_LINEAR, fill: float = 0.0) -> np.ndarray:
    """Resample a SAR image ``[h, w(, C)]`` onto the optical grid ``(W, H)``.

    Args:
        matrix: 3x3 optical -> SAR pixel transform (as fitted).
        optical_size: ``(width, height)`` of the optical grid.
    """
    flags = interpolation | cv2.WARP_INVERSE_MAP
    warped = cv2.warpPerspective(image, np.asarray(matrix, np.float64), optical_size, flags=flags,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    return warped


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Interleave two same-size images in a ``tiles x tiles`` checkerboard."""
    h, w = a.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy * tiles // h) + (xx * tiles // w)) % 2 == 0
    if a.ndim == 3:
        mask = mask[..., None]
    return np.where(mask, a, b)


CV_WARP_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)  # what cv2.warp* accepts


def warpable(data: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """``data`` in a dtype OpenCV can warp, and the cast that turns a warped band back into what is stored.

    The one place that decides how any raster is resampled with OpenCV: its own dtypes (:data:`CV_WARP_DTYPES`)
    as they are, floats as float32, complex (SLC) data as its float32 amplitude, other integer dtypes (int8,
    int32, uint32, ...) warped in float64 and rounded and clipped back into their own dtype.
    """
    if np.iscomplexobj(data):
        return np.abs(data).astype(np.float32), lambda band: band
    if data.dtype.kind == "f":
        return data.astype(np.float32, copy=False), lambda band: band
    if data.dtype.type in CV_WARP_DTYPES:
        return data, lambda band: band
    info = np.iinfo(data.dtype)
    return data.astype(np.float64), lambda band: np.clip(np.round(band), info.min, info.max).astype(data.dtype)


class ScaledImage(Protocol):
    """An image at working resolution that knows its scale to the original grid (e.g. a
    :class:`promptmid.io.PreparedImage`)."""

    def scale_matrix(self) -> np.ndarray:
        """3x3 matrix mapping working-resolution pixels to original pixels."""
        ...


def working_transform(matrix: np.ndarray, optical: ScaledImage, sar: ScaledImage) -> np.ndarray:
    """Express an optical -> SAR transform between ORIGINAL pixels as one between the working images."""
    return np.linalg.inv(sar.scale_matrix()) @ np.asarray(matrix, np.float64) @ optical.scale_matrix()


def original_transform(matrix: np.ndarray, optical: ScaledImage, sar: ScaledImage) -> np.ndarray:
    """Inverse of :func:`working_transform`: working-image transform -> original pixels."""
    return sar.scale_matrix() @ np.asarray(matrix, np.float64) @ np.linalg.inv(optical.scale_matrix())
