"""Procedural optical/SAR scene pairs with a known transform (demo, tests, augmentation).

A random land-cover map (fields with hedgerows, forest, water, roads, a town of buildings) is rendered
once as an optical RGB image and once as a SAR-like intensity image (class backscatter
unrelated to optical brightness, dark water, bright double-bounce lines on buildings,
gamma speckle), and the SAR image is warped by a known affine transform ``H`` that maps
optical pixels (x, y) to SAR pixels. Nothing here is used as a headline benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FARMLAND, FOREST, GRASS, BARE, WATER, ROAD, BUILDING, HEDGE = range(8)

# optical RGB (0-1) and SAR backscatter (linear intensity) per class
OPTICAL_COLOURS = {
    FARMLAND: (0.55, 0.60, 0.30), FOREST: (0.12, 0.30, 0.12), GRASS: (0.40, 0.55, 0.25),
    BARE: (0.70, 0.62, 0.50), WATER: (0.10, 0.20, 0.30), ROAD: (0.45, 0.45, 0.45), BUILDING: (0.80, 0.78, 0.75),
    HEDGE: (0.08, 0.22, 0.08),
}
SAR_BACKSCATTER = {FARMLAND: 0.25, FOREST: 0.55, GRASS: 0.18, BARE: 0.10, WATER: 0.01, ROAD: 0.03, BUILDING: 0.45,
                   HEDGE: 1.5}


@dataclass
class SyntheticPair:
    """A generated pair: ``optical [H, W, 3]`` float in [0, 1], ``sar [H, W]`` amplitude
    (float32, linear), ``H`` 3x3 optical->SAR pixel transform, ``labels`` the class map."""

    optical: np.ndarray
    sar: np.ndarray
    H: np.ndarray
    labels: np.ndarray


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    noise = rng.standard_normal((size, size)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), scale)
    return (noise - noise.mean()) / (noise.std() + 1e-8)


def make_labels(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random class map ``[size, size]`` uint8 and field ids ``[size, size]`` int32."""
    n_fields = max(8, size // 16)
    seeds = rng.uniform(0, size, (n_fields, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dist = (xx[..., None] - seeds[:, 0]) ** 2 + (yy[..., None] - seeds[:, 1]) ** 2
    fields = dist.argmin(axis=-1).astype(np.int32)
    field_class = rng.choice([FARMLAND, FARMLAND, FOREST, GRASS, BARE], size=n_fields)
    labels = field_class[fields].astype(np.uint8)
    boundary = cv2.morphologyEx(fields.astype(np.float32), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    labels[boundary & (rng.random(n_fields)[fields] < 0.7)] = HEDGE
    labels[_smooth_noise(rng, size, size / 12) > 1.3] = WATER
    _draw_roads(labels, rng, size)
    _draw_town(labels, rng, size)
    return labels, fields


def _draw_roads(labels: np.ndarray, rng: np.random.Generator, size: int) -> None:
    for _ in range(3):
        pts = np.cumsum(rng.normal(0, size / 8, (6, 2)), axis=0) + rng.uniform(0, size, 2)
        cv2.polylines(labels, [pts.astype(np.int32)], False, ROAD, thickness=int(rng.integers(3, 6)))


def _draw_town(labels: np.ndarray, rng: np.random.Generator, size: int) -> None:
    cx, cy = rng.uniform(0.25 * size, 0.75 * size, 2)
    for _ in range(size // 8):
        w, h = rng.integers(6, 18, 2)
        x = int(cx + rng.normal(0, size / 7))
        y = int(cy + rng.normal(0, size / 7))
        cv2.rectangle(labels, (x, y), (x + int(w), y + int(h)), BUILDING, thickness=-1)


def render_optical(labels: np.ndarray, fields: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB ``[H, W, 3]`` in [0, 1]: class colours, per-field tone, crop rows, shadows, haze."""
    size = labels.shape[0]
    lut = np.array([OPTICAL_COLOURS[c] for c in range(8)], np.float32)
    img = lut[labels]
    tone = rng.uniform(0.75, 1.25, fields.max() + 1).astype(np.float32)
    img *= np.where(labels == BUILDING, 1.0, tone[fields])[..., None]
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, np.pi, fields.max() + 1)[fields]
    rows = 0.5 + 0.5 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.8)
    img *= np.where(labels == FARMLAND, 0.92 + 0.08 * rows, 1.0)[..., None]
    img *= (1 + 0.15 * _smooth_noise(rng, size, 1.5) * (labels == FOREST))[..., None]
    shadow = np.roll(labels == BUILDING, (3, 3), axis=(0, 1)) & (labels != BUILDING)
    img[shadow] *= 0.4
    img *= (1 + 0.1 * _smooth_noise(rng, size, size / 4))[..., None]
    return np.clip(img, 0, 1)


def render_sar_intensity(labels: np.ndarray, fields: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise-free SAR intensity ``[H, W]``: class backscatter, per-field moisture, double bounce."""
    lut = np.array([SAR_BACKSCATTER[c] for c in range(8)], np.float32)
    sigma0 = lut[labels]
    moisture = rng.uniform(0.4, 2.5, fields.max() + 1).astype(np.float32)
    sigma0 *= np.where(np.isin(labels, (FARMLAND, GRASS, BARE)), moisture[fields], 1.0)
    building = (labels == BUILDING).astype(np.uint8)
    edge = cv2.dilate(building, np.ones((3, 3), np.uint8)) - building
    facing = np.roll(building, (-2, -2), axis=(0, 1)).astype(bool) & edge.astype(bool)
    sigma0[facing] = 8.0
    return sigma0


def speckle(intensity: np.ndarray, looks: float, rng: np.random.Generator) -> np.ndarray:
    """Multiply by gamma-distributed speckle with ``looks`` looks (mean 1)."""
    return intensity * rng.gamma(looks, 1.0 / looks, intensity.shape).astype(np.float32)


def random_affine(rng: np.random.Generator, size: int, max_rot_deg: float = 10.0, max_shift: float = 20.0,
                  scale_range: tuple[float, float] = (0.9, 1.1)) -> np.ndarray:
    """Random 3x3 similarity-plus-shear about the image centre (optical -> SAR pixels)."""
    angle = rng.uniform(-max_rot_deg, max_rot_deg)
    scale = rng.uniform(*scale_range)
    c = (size - 1) / 2.0
    m = cv2.getRotationMatrix2D((c, c), angle, scale)
    m[:, 2] += rng.uniform(-max_shift, max_shift, 2)
    return np.vstack([m, [0.0, 0.0, 1.0]])


def make_pair(size: int = 512, seed: int = 0, H: np.ndarray | None = None, looks: float = 4.0) -> SyntheticPair:
    """Generate an optical/SAR pair whose SAR image is the scene warped by ``H``.

    Args:
        size: side length (px) of both images.
        seed: random seed (scene, transform, speckle).
        H: 3x3 optical->SAR transform; a random small affine when ``None``.
        looks: speckle looks (lower = noisier).
    """
    rng = np.random.default_rng(seed)
    labels, fields = make_labels(size, rng)
    optical = render_optical(labels, fields, rng)
    intensity = render_sar_intensity(labels, fields, rng)
    H = random_affine(rng, size) if H is None else np.asarray(H, np.float64)
    warped = warp_like_pair(intensity, H, size)
    sar = np.sqrt(speckle(warped, looks, rng)).astype(np.float32)
    return SyntheticPair(optical.astype(np.float32), sar, H, labels)


# ----------------------------------------------------------------------------- georeferenced scenes
# Large mosaicked scenes written as GeoTIFF pairs (tests and benchmarks of promptmid.geo / promptmid.scene).


def synthetic_scene(size: int, seed: int = 0, block: int = 500, towns: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` scene mosaicked from independent :mod:`promptmid.synth` renders.

    Each ``block`` x ``block`` cell is its own random land-cover render (so tiles are distinct);
    a smooth large-scale brightness field varies over the scene. ``towns=False`` turns buildings
    into grass: their optical shadows and SAR double-bounce lines are displaced differently in the two
    renders, which biases matches by ~1 px (a modality effect, not a registration error).

    Returns:
        optical ``[size, size, 3]`` uint8 (no zeros, 0 is kept for nodata) and noise-free SAR
        intensity ``[size, size]`` float32, on the same pixel grid.
    """
    optical = np.empty((size, size, 3), np.uint8)
    intensity = np.empty((size, size), np.float32)
    yy, xx = np.mgrid[0:block, 0:block].astype(np.float32) / size
    for i, y0 in enumerate(range(0, size, block)):
        for j, x0 in enumerate(range(0, size, block)):
            rng = np.random.default_rng([seed, i, j])
            labels, fields = make_labels(block, rng)
            if not towns:
                labels[labels == BUILDING] = GRASS
            tone = 1 + 0.25 * np.sin(2 * np.pi * (xx + x0 / size) * 1.3 + seed) * np.cos(2 * np.pi * (yy + y0 / size))
            opt = render_optical(labels, fields, rng) * tone[..., None]
            h, w = min(block, size - y0), min(block, size - x0)
            optical[y0:y0 + h, x0:x0 + w] = np.clip(opt[:h, :w] * 254 + 1, 1, 255).astype(np.uint8)
            intensity[y0:y0 + h, x0:x0 + w] = render_sar_intensity(labels, fields, rng)[:h, :w]
    return optical, intensity


def map_error_matrix(rotation_deg: float, shift_m: tuple[float, float], centre: tuple[float, float]) -> np.ndarray:
    """3x3 map -> map rigid error: rotation (counter-clockwise, degrees) about ``centre``, then a shift (metres)."""
    c, s = np.cos(np.deg2rad(rotation_deg)), np.sin(np.deg2rad(rotation_deg))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    cx, cy = centre
    return (np.array([[1, 0, cx + shift_m[0]], [0, 1, cy + shift_m[1]], [0, 0, 1.0]]) @ rot
            @ np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1.0]]))


def write_synthetic_geo_pair(directory: str | Path, size: int = 1024, seed: int = 0,
                             H: np.ndarray | None = None, rotation_deg: float = 0.0,
                             shift_m: tuple[float, float] = (0.0, 0.0), looks: float = 30.0,
                             sar_crs: str | None = None, epsg: int = 32633, pixel_size: float = 10.0,
                             origin: tuple[float, float] = (500000.0, 5100000.0), towns: bool = True,
                             sar_from_optical: bool = False) -> dict[str, Any]:
    """Write ``optical.tif`` (uint8 RGB, nodata 0) and ``sar.tif`` (float32 amplitude, nodata 0) GeoTIFFs.

    The SAR pixels are the scene warped by ``H`` (optical px -> SAR px, affine), and the SAR
    geotransform is the *true* one composed with a map error ``E`` (rotation ``rotation_deg`` about
    the scene centre, then ``shift_m``), so the correct answer is: optical map ``X`` lies at SAR-claimed
    map ``E X``, i.e. the fitted optical px -> SAR px transform equals ``H``. With ``sar_crs`` the SAR
    file is reprojected into that CRS (e.g. ``"EPSG:4326"``). ``towns``: see :func:`synthetic_scene`; ``sar_from_optical``: the "SAR" is the optical luminance
    (no modality gap: isolates the geometry of the pipeline from descriptor biases).

    Returns:
        ``{"optical", "sar": paths, "H", "E": 3x3 arrays, "optical_transform": Affine}``.
    """
    import rasterio
    from rasterio.transform import Affine

    from promptmid.geo import pixel_to_map_matrix
    from promptmid.geometry import apply_transform

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    H = np.eye(3) if H is None else np.asarray(H, np.float64)
    optical, intensity = synthetic_scene(size, seed, towns=towns)
    if sar_from_optical:
        intensity = (optical.astype(np.float32).mean(-1) / 255.0) ** 2
    warped = warp_like_pair(intensity, H, size)
    sar = np.sqrt(speckle(warped, looks, np.random.default_rng(seed + 1))).astype(np.float32)
    a_opt = Affine(pixel_size, 0, origin[0], 0, -pixel_size, origin[1])
    centre = tuple(apply_transform(pixel_to_map_matrix(a_opt), np.array([[size / 2, size / 2]]))[0])
    E = map_error_matrix(rotation_deg, shift_m, centre)
    m_sar = E @ pixel_to_map_matrix(a_opt) @ np.linalg.inv(H) @ np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1.0]])
    a_sar = Affine(*m_sar[0], *m_sar[1])
    crs = rasterio.crs.CRS.from_epsg(epsg)
    paths = {"optical": directory / "optical.tif", "sar": directory / "sar.tif"}
    write_geotiff(paths["optical"], np.moveaxis(optical, -1, 0), crs, a_opt, 0)
    if sar_crs is None:
        write_geotiff(paths["sar"], sar[None], crs, a_sar, 0)
    else:
        _write_reprojected(paths["sar"], sar, crs, a_sar, rasterio.crs.CRS.from_user_input(sar_crs))
    return {**paths, "H": H, "E": E, "optical_transform": a_opt}


def warp_like_pair(image: np.ndarray, H: np.ndarray, size: int) -> np.ndarray:
    """Warp so that content at optical px ``p`` appears at ``H p`` (as :func:`promptmid.make_pair`)."""
    return cv2.warpPerspective(image, np.asarray(H, np.float64), (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


def write_geotiff(path: Path, bands: np.ndarray, crs: Any, transform: Any, nodata: float) -> None:
    """Write ``[C, H, W]`` bands as a tiled, compressed GeoTIFF."""
    import rasterio

    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                       dtype=bands.dtype, crs=crs, transform=transform, nodata=nodata, tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", BIGTIFF="IF_SAFER") as dst:
        dst.write(bands)


def _write_reprojected(path: Path, sar: np.ndarray, crs: Any, transform: Any, dst_crs: Any) -> None:
    from rasterio.enums import Resampling
    from rasterio.warp import calculate_default_transform, reproject

    h, w = sar.shape
    bounds = _bounds(transform, w, h)
    dst_t, dw, dh = calculate_default_transform(crs, dst_crs, w, h, *bounds)
    out = np.zeros((dh, dw), np.float32)
    reproject(sar, out, src_transform=transform, src_crs=crs, dst_transform=dst_t, dst_crs=dst_crs,
              src_nodata=0, dst_nodata=0, resampling=Resampling.bilinear)
    write_geotiff(path, out[None], dst_crs, dst_t, 0)


def _bounds(transform: Any, w: int, h: int) -> tuple[float, float, float, float]:
    corners = np.array([transform * (0, 0), transform * (w, 0), transform * (0, h), transform * (w, h)])
    return corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()
