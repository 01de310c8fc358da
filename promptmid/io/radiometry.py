"""Radiometry and masks: optical and SAR values to ``[0, 1]`` (log/dB/linear SAR scaling, percentile stretch),
border fill detection and nodata filling."""

from __future__ import annotations

import cv2
import numpy as np

from promptmid.errors import InputError

def border_fill_mask(gray: np.ndarray, min_fraction: float = 0.01) -> np.ndarray:
    """Find exact-zero fill connected to the image border (e.g. black rotation corners).

    Args:
        gray: ``[H, W]`` raw values.
        min_fraction: ignore fill smaller than this fraction of the image.

    Returns:
        ``[H, W]`` bool, True on fill pixels.
    """
    zero = (gray == 0).astype(np.uint8)
    if not zero.any():
        return np.zeros(gray.shape, bool)
    n, labels = cv2.connectedComponents(zero, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = np.isin(labels, border[border > 0])
    return fill if fill.mean() >= min_fraction else np.zeros(gray.shape, bool)


def stretch(values: np.ndarray, valid: np.ndarray, lo: float = 1.0, hi: float = 99.0) -> np.ndarray:
    """Percentile-stretch ``[H, W]`` values to ``[0, 1]`` using valid pixels only."""
    p_lo, p_hi = np.percentile(values[valid], [lo, hi])
    if p_hi <= p_lo:
        p_lo, p_hi = float(values[valid].min()), float(values[valid].max())
    out = (values.astype(np.float32) - p_lo) / max(p_hi - p_lo, 1e-12)
    return np.clip(out, 0.0, 1.0)


SAR_SCALES = ("auto", "log", "linear", "db")


def sar_scale_of(data: np.ndarray, valid: np.ndarray, scale: str = "auto") -> str:
    """The SAR scaling :func:`sar_to_unit` applies: ``scale`` itself, or for ``"auto"``: ``"linear"`` for uint8
    (already display-scaled), ``"db"`` for data with negative values (a logarithmic product, e.g. Sentinel-1
    backscatter in dB), ``"log"`` otherwise (raw amplitude or intensity).

    Raises:
        InputError: an unknown ``scale``.
    """
    if scale not in SAR_SCALES:
        raise InputError(f"Unknown SAR scaling {scale!r}; valid: {', '.join(SAR_SCALES)}.")
    if scale != "auto":
        return scale
    if data.dtype == np.uint8:
        return "linear"
    values = data[valid] if valid.any() else data.reshape(-1, data.shape[-1])
    return "db" if bool((values < 0).any()) else "log"


def sar_to_unit(data: np.ndarray, valid: np.ndarray, scale: str = "auto") -> np.ndarray:
    """Turn SAR amplitude/intensity ``[H, W, C]`` into one ``[H, W]`` band in ``[0, 1]``.

    ``scale`` (:data:`SAR_SCALES`, resolved by :func:`sar_scale_of`): ``"log"`` (``log10`` of linear
    amplitude/intensity), ``"linear"`` (stretch as is), ``"db"`` (values already logarithmic: stretched as
    is, never logged twice) or ``"auto"``. Multi-band linear SAR (the bands :func:`choose_bands` kept, e.g.
    HH/HV given with ``--sar-bands 1,2``) is averaged in power, dB bands are averaged in dB.
    """
    scale = sar_scale_of(data, valid, scale)
    band = data.astype(np.float64)
    if band.shape[-1] > 1:
        band = band.mean(axis=-1) if scale == "db" else np.sqrt((band**2).mean(axis=-1))
    else:
        band = band[..., 0]
    use_log = scale == "log"
    if use_log:
        floor = np.percentile(band[valid & (band > 0)], 0.1) if (band[valid] > 0).any() else 1e-6
        band = np.log10(np.maximum(band, floor))
    return stretch(band, valid)


def optical_to_unit(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Turn optical ``[H, W, C]`` into ``[H, W, 3]`` in ``[0, 1]``.

    Expects the bands :func:`choose_bands` picked: 1 band: gray; 3: red, green, blue (for other counts: band 1
    if fewer than 3, else the first three).
    uint8 data is scaled by 1/255, anything else is percentile-stretched per band.
    """
    c = data.shape[-1]
    bands = data[..., :1] if c <= 2 else data[..., :3]
    if data.dtype == np.uint8:
        out = bands.astype(np.float32) / 255.0
    else:
        out = np.stack([stretch(bands[..., i], valid) for i in range(bands.shape[-1])], axis=-1)
    return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


HOLE_PX = 5  # nodata holes narrower than this (px) are filled from their neighbourhood and count as valid


def fill_nodata(image: np.ndarray, valid: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """``image`` (``[H, W]`` or ``[H, W, C]``) with its nodata pixels replaced by the Gaussian-weighted mean of the
    valid pixels around them (normalised convolution), so that nodata makes no edges; far from any valid pixel:
    the valid mean."""
    if valid.all():
        return image
    img = image.astype(np.float32)
    w = valid.astype(np.float32)
    weights = w if img.ndim == 2 else w[..., None]
    num = cv2.GaussianBlur(img * weights, (0, 0), sigma)
    den = cv2.GaussianBlur(w, (0, 0), sigma)
    den = den if img.ndim == 2 else den[..., None]
    mean = (img * weights).sum(axis=(0, 1)) / max(float(w.sum()), 1.0)
    fill = np.where(den > 1e-3, num / np.maximum(den, 1e-3), mean)
    return np.where(weights > 0, img, fill).astype(np.float32)


def fill_holes(unit: np.ndarray, valid: np.ndarray, width: int = HOLE_PX,
               only: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fill nodata holes narrower than ``width`` px (scattered NaN/inf pixels of a float SAR product) from their
    neighbourhood and count them as valid, so that isolated black specks draw no keypoints, gradients or
    refinement blocks. Large nodata areas (borders, swath edges) are left as they are; with ``only`` (a mask),
    only those pixels may be filled.

    Returns:
        ``(unit, valid)`` with the holes filled and marked valid.
    """
    closed = cv2.morphologyEx(valid.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((width, width), np.uint8),
                              borderType=cv2.BORDER_REPLICATE).astype(bool)
    holes = closed & ~valid & (True if only is None else only)
    if not holes.any():
        return unit, valid
    filled = fill_nodata(unit, valid)
    return np.where((holes[..., None] if unit.ndim == 3 else holes), filled, unit).astype(np.float32), valid | holes
