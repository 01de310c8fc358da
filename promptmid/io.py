"""Reading images (PNG/JPEG/TIFF/GeoTIFF), radiometric scaling of optical and SAR data.

Every image goes through :func:`load_image`, which returns a :class:`PreparedImage`:
a 3-channel float32 array in ``[0, 1]`` at working resolution, a validity mask, and the
scale back to the original pixel grid. Pixel convention: (x, y) = (column, row), pixel
centres at integer coordinates, origin at the centre of the top-left pixel.
A working-resolution point ``p`` maps to the original image as ``(p + 0.5) * scale - 0.5``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import cv2
import numpy as np

from promptmid.errors import InputError
from promptmid.geometry import Size

Modality = Literal["optical", "sar"]

MIN_SIDE = 32  # smallest side (px) the models can use


@dataclass
class RasterImage:
    """Raw pixels as read from disk.

    Attributes:
        data: ``[H, W, C]`` array in the file's dtype (all C bands of the file).
        path: where it came from (``None`` for in-memory arrays).
        nodata: the file's nodata value, if any.
        crs: CRS as WKT, or ``None`` when not georeferenced.
        transform: affine geotransform (rasterio ``Affine``) of the file's full grid, or ``None``.
        full_size: the file's size when ``data`` was read decimated (a large image read only up to the
            working size), else ``None``; see :attr:`original_size`.
        descriptions: per-band descriptions (e.g. ``("B02", "B03", "B04", "B08")`` or ``("VV", "VH")``; ``None``
            where a band has none); empty when unknown (arrays).
        colorinterp: per-band colour interpretation names (``"red"``, ``"gray"``, ``"alpha"``, ...); empty when
            unknown. Both drive :func:`choose_bands`.
    """

    data: np.ndarray
    path: Path | None = None
    nodata: float | None = None
    crs: str | None = None
    transform: Any = None
    full_size: Size | None = None
    descriptions: tuple[str | None, ...] = ()
    colorinterp: tuple[str, ...] = ()

    @property
    def original_size(self) -> Size:
        """``(width, height)`` of the image in the file (the size every result refers to)."""
        return self.full_size or self.size

    def full(self) -> "RasterImage":
        """The raster at full resolution (read again from its file when ``data`` is decimated)."""
        return self if self.full_size is None or self.path is None else read_raster(self.path)

    def pick(self, bands: Sequence[int]) -> "RasterImage":
        """The same raster with only ``bands`` (1-based, in that order)."""
        idx = [b - 1 for b in bands]
        keep = lambda items: tuple(items[i] for i in idx) if len(items) == self.data.shape[-1] else ()  # noqa: E731
        return dataclasses.replace(self, data=self.data[..., idx], descriptions=keep(self.descriptions),
                                   colorinterp=keep(self.colorinterp))

    @property
    def size(self) -> Size:
        """``(width, height)`` in pixels."""
        return Size.of(self.data)


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
    bands: "BandChoice | None" = None

    def to_original(self, points: np.ndarray) -> np.ndarray:
        """Map ``[N, 2]`` working-resolution (x, y) to original pixel coordinates."""
        return to_original(points, self.scale)

    def scale_matrix(self) -> np.ndarray:
        """3x3 matrix mapping working-resolution pixels to original pixels."""
        sx, sy = self.scale
        return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1.0]])


def working_transform(matrix: np.ndarray, optical: PreparedImage, sar: PreparedImage) -> np.ndarray:
    """Express an optical -> SAR transform between ORIGINAL pixels as one between the working images."""
    return np.linalg.inv(sar.scale_matrix()) @ np.asarray(matrix, np.float64) @ optical.scale_matrix()


def original_transform(matrix: np.ndarray, optical: PreparedImage, sar: PreparedImage) -> np.ndarray:
    """Inverse of :func:`working_transform`: working-image transform -> original pixels."""
    return sar.scale_matrix() @ np.asarray(matrix, np.float64) @ np.linalg.inv(optical.scale_matrix())


def to_original(points: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Map ``[N, 2]`` working-resolution (x, y) to original pixels for ``scale = (sx, sy)`` (original px per
    working px; pixel centres at integers in both)."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * np.asarray(scale, dtype=np.float64) - 0.5


DECIMATE_ABOVE = 2  # read decimated when the long side exceeds this many times the working size


def check_image_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` if it names a non-empty file (cheap: nothing is read).

    Raises:
        InputError: no such file, a directory, or an empty file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"No image at path {path}.")
    if path.is_dir():
        raise InputError(f"{path} is a directory, not an image.")
    if path.stat().st_size == 0:
        raise InputError(f"{path} is an empty file.")
    return path


def read_raster(path: str | Path, max_side: int | None = None) -> RasterImage:
    """Read an image file into a :class:`RasterImage` (all bands, native dtype).

    With ``max_side``, an image whose long side exceeds ``DECIMATE_ABOVE * max_side`` is read decimated
    (nearest neighbour, whole-pixel steps) to about that size, so memory stays bounded whatever the file
    size; ``full_size`` then records the file's size and :meth:`RasterImage.full` reads it all when a product
    needs full resolution.

    Raises:
        InputError: missing, unreadable or empty file, or an unsupported band count.
    """
    path = check_image_path(path)
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                step = _decimation(src.width, src.height, max_side)
                out_shape = (src.count, -(-src.height // step), -(-src.width // step))
                data = src.read() if step == 1 else src.read(out_shape=out_shape)
                full_size = Size(src.width, src.height) if step > 1 else None
                crs = src.crs.to_wkt() if src.crs else None
                transform = src.transform if src.crs else None
                nodata = src.nodata
                driver = src.driver
                meta = {"descriptions": tuple(src.descriptions), "colorinterp": tuple(c.name for c in src.colorinterp)}
                if meta["colorinterp"] == ("palette",):
                    data, meta = expand_palette(data[0], src.colormap(1))
    except (RasterioIOError, ValueError) as exc:
        raise InputError(f"Cannot read {path} as an image ({exc}).") from None
    if driver in ("PNG", "JPEG"):
        _check_complete(path)
    return RasterImage(np.moveaxis(data, 0, -1), path, nodata, crs, transform, full_size, **meta)


def expand_palette(indices: np.ndarray, colormap: dict[int, tuple[int, ...]]) -> tuple[np.ndarray, dict[str, Any]]:
    """A palette image (``[H, W]`` colour-table indices) as its colours: ``([3 or 4, H, W] uint8, meta)``.

    The indices of a palette image are labels, not brightness (a shuffled palette shows the same picture with other
    numbers): the models must see the colours. An alpha band is kept when the table has transparent entries.
    """
    size = max(256, int(indices.max()) + 1)
    lut = np.zeros((size, 4), np.uint8)
    lut[:, 3] = 255
    for index, colour in colormap.items():
        if 0 <= index < size:
            lut[index, :len(colour)] = colour[:4]
    bands = 4 if (lut[np.unique(indices), 3] < 255).any() else 3
    data = np.moveaxis(lut[indices][..., :bands], -1, 0)
    names = ("red", "green", "blue", "alpha")[:bands]
    return np.ascontiguousarray(data), {"descriptions": (None,) * bands, "colorinterp": names}


def _decimation(width: int, height: int, max_side: int | None) -> int:
    """Whole-pixel read step for a file of ``width x height`` px (1 = read everything)."""
    if not max_side or max(width, height) <= DECIMATE_ABOVE * max_side:
        return 1
    return -(-max(width, height) // (DECIMATE_ABOVE * max_side))  # ceil: the read stays <= that size


def _check_complete(path: Path) -> None:
    """GDAL fills a truncated PNG/JPEG with zeros silently; a full decode with Pillow notices it.

    Raises:
        InputError: the file is truncated or corrupt.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path} is truncated or corrupt ({exc}).") from None


def as_raster(source: str | Path | np.ndarray | RasterImage, max_side: int | None = None) -> RasterImage:
    """Accept a path (read decimated up to ``max_side``, see :func:`read_raster`), an ``[H, W]`` /
    ``[H, W, C]`` array, or a :class:`RasterImage`."""
    if isinstance(source, RasterImage):
        return source
    if isinstance(source, np.ndarray):
        data = source[..., None] if source.ndim == 2 else source
        if data.ndim != 3:
            raise InputError(f"Expected an [H, W] or [H, W, C] array, got shape {source.shape}.")
        return RasterImage(data)
    return read_raster(source, max_side)


def _name(raster: RasterImage) -> str:
    return str(raster.path) if raster.path else "input array"


def check_raster(raster: RasterImage, nan_as_nodata: bool = False, mask: np.ndarray | None = None) -> np.ndarray:
    """Validate a raster (the bands the models will see) and return its ``[H, W]`` validity mask (before fill
    detection): False where a band is NaN/inf (allowed only with ``nan_as_nodata`` or a NaN nodata value), where
    every band equals the nodata value, and where ``mask`` (e.g. an alpha band) is False.

    Raises:
        InputError: empty, too small, NaNs (unless allowed), no valid pixel, or a constant image.
    """
    data, name = raster.data, _name(raster)
    h, w, c = data.shape
    if h == 0 or w == 0 or c == 0:
        raise InputError(f"{name} is empty (size {w}x{h}, {c} bands).")
    if min(h, w) < MIN_SIDE:
        raise InputError(f"{name} is {w}x{h} px; the models need at least {MIN_SIDE} px a side.")
    finite = np.isfinite(data).all(axis=-1) if data.dtype.kind == "f" else np.ones((h, w), bool)
    nan_nodata = raster.nodata is not None and np.isnan(raster.nodata)
    if not finite.all() and not (nan_as_nodata or nan_nodata):
        raise InputError(
            f"{name} contains {int((~finite).sum())} NaN/inf pixels; pass --nan-as-nodata to treat them as nodata."
        )
    valid = finite if mask is None else finite & mask
    if raster.nodata is not None and not nan_nodata:
        valid &= ~(data == raster.nodata).all(axis=-1)
    if not valid.any():
        raise InputError(f"{name} has no valid pixel (all nodata, NaN/inf or masked).")
    vals = data[valid]
    if float(np.ptp(vals)) == 0.0:
        raise InputError(f"{name} is constant (every valid pixel is {vals.flat[0]}); nothing to match.")
    return valid


# ---------------------------------------------------------------------------------------------------------------
# Band choice (which bands of a multi-band file the models see)

S2_RGB_BY_COUNT = {12: (4, 3, 2), 13: (4, 3, 2)}  # Sentinel-2 L2A (12 bands, no B10) / L1C (13): B04, B03, B02
COLOUR_NAMES = {"red": "red", "green": "green", "blue": "blue", "b04": "red", "b4": "red", "b03": "green",
                "b3": "green", "b02": "blue", "b2": "blue"}  # band descriptions (Sentinel-2 / Landsat 8-9 names)
CO_POL = ("vv", "hh")  # dual-pol SAR: the co-polarised band is used


@dataclass(frozen=True)
class BandChoice:
    """Which bands of a file are used, and why.

    Attributes:
        bands: 1-based band numbers (as GDAL) given to the models, in order (optical: red, green, blue or one
            gray band; SAR: one band, or several averaged in power / in dB).
        alpha: 1-based band used as a validity mask (colour interpretation ``alpha``; 0 = invalid), or ``None``.
        rule: how the choice was made (``"user"``, ``"colour interpretation"``, ``"band descriptions"``, ...).
        names: the descriptions of the chosen bands (empty strings where the file has none).
    """

    bands: tuple[int, ...]
    alpha: int | None
    rule: str
    names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"bands": list(self.bands), "alpha": self.alpha, "rule": self.rule, "names": list(self.names)}


def parse_bands(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"4,3,2"`` (1-based, as GDAL) or a sequence of ints -> ``(4, 3, 2)``; ``None``/empty -> ``None``.

    Raises:
        InputError: not a comma-separated list of positive integers.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        bands = tuple(int(str(b).strip()) for b in items)
    except ValueError:
        raise InputError(f"Cannot parse band list {text!r}; use 1-based band numbers, e.g. '4,3,2'.") from None
    if not bands or min(bands) < 1:
        raise InputError(f"Band numbers are 1-based (as GDAL); got {text!r}.")
    return bands


def choose_bands(raster: RasterImage, modality: Modality, requested: str | Sequence[int] | None = None) -> BandChoice:
    """The bands of ``raster`` to use for ``modality`` (see the README section "Bands").

    Optical: ``requested`` (1 or 3 bands) if given; else red/green/blue by colour interpretation, else by band
    descriptions (``B04,B03,B02`` / ``red,green,blue``), else by count: 1-2 bands -> band 1 (gray),
    3-4 -> bands 1,2,3 (RGB, RGBA, RGBN), 12-13 -> 4,3,2 (Sentinel-2 L2A / L1C order).
    SAR: ``requested`` (any number of bands, averaged) if given; else the co-polarised band (description
    ``VV`` or ``HH``), else band 1 of a 2-band file (dual-pol products put the co-pol band first), else every
    band of a 1-4 band file (averaged). A band is an alpha mask only when its colour interpretation says so.

    Raises:
        InputError: a band number beyond the file's count, or a band layout that cannot be guessed.
    """
    count, name = raster.data.shape[-1], _name(raster)
    colour = [c.lower() for c in raster.colorinterp] if len(raster.colorinterp) == count else [""] * count
    desc = [(d or "") for d in raster.descriptions] if len(raster.descriptions) == count else [""] * count
    alpha = next((i + 1 for i, c in enumerate(colour) if c == "alpha"), None)
    wanted = parse_bands(requested)
    if wanted:
        flag = "--optical-bands" if modality == "optical" else "--sar-bands"
        if max(wanted) > count:
            raise InputError(f"{name} has {count} bands; {flag} asks for band {max(wanted)}.")
        if modality == "optical" and len(wanted) not in (1, 3):
            raise InputError(f"{flag} takes 1 (gray) or 3 (red,green,blue) bands; got {len(wanted)}.")
        bands, rule = wanted, "user"
    else:
        usable = [i + 1 for i in range(count) if i + 1 != alpha]
        bands, rule = (_auto_optical if modality == "optical" else _auto_sar)(usable, colour, desc, name)
    return BandChoice(tuple(bands), alpha if alpha not in bands else None, rule, tuple(desc[b - 1] for b in bands))


def _auto_optical(usable: list[int], colour: list[str], desc: list[str], name: str) -> tuple[list[int], str]:
    for names, rule in ((colour, "colour interpretation"), ([COLOUR_NAMES.get(d.lower().strip(), "") for d in desc],
                                                              "band descriptions")):
        rgb = [names.index(c) + 1 if c in names else None for c in ("red", "green", "blue")]
        if all(rgb):
            return [int(b) for b in rgb], rule  # type: ignore[arg-type]
    n = len(usable)
    if n in (1, 2):
        return usable[:1], "gray (band 1)"
    if n in (3, 4):
        return usable[:3], "bands 1,2,3 as red, green, blue"
    if n in S2_RGB_BY_COUNT:
        return list(S2_RGB_BY_COUNT[n]), f"Sentinel-2 order ({n} bands): B04, B03, B02"
    raise InputError(f"{name} has {n} bands and no red/green/blue colour interpretation or band descriptions; "
                     f"say which to use with --optical-bands, e.g. '4,3,2'.")


def _auto_sar(usable: list[int], colour: list[str], desc: list[str], name: str) -> tuple[list[int], str]:
    for pol in CO_POL:
        hit = [b for b in usable if desc[b - 1].strip().lower() == pol]
        if hit:
            return hit[:1], f"co-polarised band ({pol.upper()}) by band description"
    n = len(usable)
    if n == 2:
        return usable[:1], "band 1 of 2 (dual-pol: co-polarised band first)"
    if 1 <= n <= 4:
        return usable, "all bands" if n > 1 else "single band"
    raise InputError(f"{name} has {n} bands and no VV/HH band description; say which to use with --sar-bands, "
                     f"e.g. '1'.")


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
            raise InputError(f"{_name(raster)} is complex-valued; only SAR (SLC) input may be complex.")
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
            raise InputError(f"{_name(raster)} has almost no valid pixels after masking fill/nodata.")
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


def open_for_write(path: Path, profile: dict[str, Any]) -> Any:
    """Open a raster for writing; a plain (non-georeferenced) TIFF raises no warning."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, "w", **profile)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``[0, 1]`` float image to uint8."""
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write an RGB ``[H, W, 3]`` (or gray) uint8/float image as PNG."""
    img = to_uint8(image) if image.dtype != np.uint8 else image
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise InputError(f"Cannot write {path}.")
