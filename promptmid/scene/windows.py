"""Windowed reads: optical windows, decimated overviews, and SAR chips resampled through a prior; the read cache and
heap trimming that keep a scene's memory flat over its tiles."""

from __future__ import annotations

from typing import Any

import numpy as np

from promptmid.geometry import CV_WARP_DTYPES, Size, apply_transform, translation, warp_to_optical

CV_DTYPES = tuple(np.dtype(t).name for t in CV_WARP_DTYPES)  # dtype names OpenCV warps as they are


def read_window(ds: Any, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Read pixels ``[y0, y0 + h) x [x0, x0 + w)`` of an open dataset as ``[h, w, C]``."""
    from rasterio.windows import Window

    return np.moveaxis(ds.read(window=Window(x0, y0, w, h)), 0, -1)


def read_overview(ds: Any, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Decimated read ``[h, w, C]`` (long side <= ``max_side``) and the 3x3 overview px -> full px matrix."""
    from rasterio.enums import Resampling

    f = min(1.0, max_side / max(ds.width, ds.height))
    ow, oh = max(32, round(ds.width * f)), max(32, round(ds.height * f))
    data = ds.read(out_shape=(ds.count, oh, ow), resampling=Resampling.average)
    sx, sy = ds.width / ow, ds.height / oh
    return np.moveaxis(data, 0, -1), np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def band_meta(ds: Any) -> dict[str, tuple]:
    """Band descriptions and colour interpretations of an open dataset, as :class:`promptmid.io.RasterImage`
    fields (they drive the automatic band choice of every window read from it)."""
    return {"descriptions": tuple(ds.descriptions), "colorinterp": tuple(c.name for c in ds.colorinterp)}


def window_raster(data: np.ndarray, ds: Any, nodata: float | None = None) -> Any:
    """A :class:`promptmid.io.RasterImage` of pixels read from ``ds`` (its nodata unless given, its band metadata)."""
    from promptmid.io import RasterImage

    return RasterImage(data, nodata=ds.nodata if nodata is None else nodata, **band_meta(ds))


def cv_ready(data: np.ndarray) -> np.ndarray:
    return data if data.dtype.name in CV_DTYPES else data.astype(np.float32)


def sar_chip(sar_ds: Any, chip_to_sar: np.ndarray, size: Size, fill: float) -> np.ndarray | None:
    """Resample the SAR onto a chip grid of ``size = (W, H)`` through ``chip_to_sar`` (chip px -> SAR px).

    Only the SAR window under the chip is read. ``None`` when the chip misses the SAR image.
    """
    w, h = size
    corners = apply_transform(chip_to_sar, np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float))
    window = clip_box(corners, sar_ds.width, sar_ds.height)
    if window is None:
        return None
    sx0, sy0, sw, sh = window
    data = cv_ready(read_window(sar_ds, sx0, sy0, sw, sh))
    m = translation(-sx0, -sy0) @ chip_to_sar
    return np.stack([warp_to_optical(data[..., i], m, (w, h), fill=fill) for i in range(data.shape[-1])], -1)


def clip_box(points: np.ndarray, width: int, height: int, pad: int = 2) -> tuple[int, int, int, int] | None:
    x0, y0 = np.floor(points.min(0)).astype(int) - pad
    x1, y1 = np.ceil(points.max(0)).astype(int) + pad + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    return None if x1 - x0 < 2 or y1 - y0 < 2 else (int(x0), int(y0), int(x1 - x0), int(y1 - y0))


READ_CACHE_MB = 64  # GDAL block cache while a scene is open (MB). Each tile reads its own windows once, so a cache
# only helps within a tile; GDAL's default (5% of RAM) kept every block read, and the process grew by ~9 MB per tile
# of a 10k x 10k scene (550 MB over 64 tiles): the peak memory that grew with --max-tiles


def trim_heap() -> None:
    """Hand the heap's free memory back to the system (glibc ``malloc_trim``; nothing elsewhere).

    A tile allocates and frees hundreds of MB of arrays of a few MB each (prepared windows, feature maps, warps);
    glibc keeps such freed blocks in its heap (its mmap threshold rises after the first large frees), so without
    this the process grew by ~30 MB per tile of a 10k x 10k scene (free heap memory, not live data)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None  # the C library once :func:`trim_heap` looked for it (False: none with malloc_trim)
