"""Procedural optical/SAR scene pairs with a known transform (demo, tests, augmentation).

A random land-cover map (fields with hedgerows, forest, water, roads, a town of buildings) is rendered
once as an optical RGB image and once as a SAR-like intensity image (class backscatter
unrelated to optical brightness, dark water, bright double-bounce lines on buildings,
gamma speckle), and the SAR image is warped by a known affine transform ``H`` that maps
optical pixels (x, y) to SAR pixels. Nothing here is used as a headline benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    warped = cv2.warpPerspective(intensity, H, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)
    sar = np.sqrt(speckle(warped, looks, rng)).astype(np.float32)
    return SyntheticPair(optical.astype(np.float32), sar, H, labels)
