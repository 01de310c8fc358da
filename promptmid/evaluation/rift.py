"""A RIFT-style matcher (Li, Hu & Ai, "RIFT: Multi-modal image matching based on radiation-variation
insensitive feature transform", IEEE TIP 2020), implemented from the paper with numpy/scipy/OpenCV.

Pipeline, on the gray working-resolution image (x = column, y = row, pixel centres at integers):

1. **Phase congruency** (Kovesi's ``phasecong3``): log-Gabor filters of ``n_scales`` scales x
   ``n_orient`` orientations applied in the Fourier domain; per orientation the noise-compensated,
   frequency-spread-weighted PC; the maximum (``M``) and minimum (``m``) moments of PC.
2. **Keypoints**: FAST on ``M`` (edge-like) and ``m`` (corner-like), strongest ``max_keypoints``,
   on valid pixels only.
3. **Maximum index map (MIM)**: per pixel, the orientation whose log-Gabor amplitude summed over
   scales is largest.
4. **Descriptor**: a ``patch``-px square around the keypoint, split into ``grid x grid`` cells, each
   with a histogram of MIM values (``n_orient`` bins) -> ``grid*grid*n_orient`` dims, L2-normalised.

Rotation: RIFT's MIM changes under rotation (orientation labels shift). Here, as in RIFT2, each
keypoint gets a dominant orientation ``phi`` (mod 180 deg) from the PC structure tensor (doubled-angle
mean of the per-orientation amplitudes); the sampling grid is rotated by ``phi`` and MIM labels are
re-indexed relative to ``phi``. The 180-deg ambiguity is covered by describing every SAR keypoint at
``phi`` and ``phi + 180``. Matching is mutual nearest neighbour on the descriptors.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from promptmid.config import merge_options
from promptmid.evaluation.base import MethodFn, MethodSpec, gray_uint8, in_valid, output, timed
from promptmid.io import PreparedImage
from promptmid.matching import mutual_nearest_neighbours

default_conf: dict[str, Any] = {
    "n_scales": 4,  # log-Gabor scales
    "n_orient": 6,  # log-Gabor orientations (= MIM labels = histogram bins)
    "min_wavelength": 3.0,  # wavelength (px) of the smallest scale filter
    "mult": 1.6,  # scaling factor between successive filters
    "sigma_onf": 0.75,  # ratio of the log-Gabor std to the centre frequency
    "k_noise": 3.0,  # noise threshold in standard deviations of the noise energy
    "cut_off": 0.5,  # frequency-spread weighting: fractional cut-off
    "g": 3.0,  # frequency-spread weighting: sharpness
    "max_keypoints": 2000,  # keypoints per image (FAST on M and m, strongest kept)
    "fast_threshold": 1,  # FAST threshold on the 0-255 scaled moment maps
    "patch": 72,  # descriptor patch side (px, working resolution)
    "grid": 6,  # patch cells per side
    "samples": 36,  # sampling points per patch side
    "max_side": 640,  # RIFT works at this long side (px) at most; matches are returned in original px
}


def log_gabor_bank(shape: tuple[int, int], conf: dict[str, Any]) -> np.ndarray:
    """Frequency-domain filters ``[n_orient, n_scales, H, W]`` (log-Gabor radial x raised-cosine angular)."""
    rows, cols = shape
    fx = np.fft.fftfreq(cols)[None, :]
    fy = np.fft.fftfreq(rows)[:, None]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    theta = np.arctan2(-fy, fx)
    lowpass = 1.0 / (1.0 + (radius / 0.45) ** 30)
    radial = []
    for s in range(conf["n_scales"]):
        fo = 1.0 / (conf["min_wavelength"] * conf["mult"] ** s)
        lg = np.exp(-(np.log(radius / fo)) ** 2 / (2 * np.log(conf["sigma_onf"]) ** 2)) * lowpass
        lg[0, 0] = 0.0
        radial.append(lg)
    angular = []
    n_or = conf["n_orient"]
    for o in range(n_or):
        angle = o * np.pi / n_or
        dtheta = np.abs(np.arctan2(np.sin(theta - angle), np.cos(theta - angle)))
        dtheta = np.minimum(dtheta * n_or / 2, np.pi)
        angular.append((np.cos(dtheta) + 1) / 2)
    return np.stack([np.stack([a * r for r in radial]) for a in angular]).astype(np.float32)


def phase_congruency(image: np.ndarray, conf: dict[str, Any]) -> dict[str, np.ndarray]:
    """Phase congruency of a ``[H, W]`` float image.

    Returns:
        ``M``, ``m``: ``[H, W]`` maximum / minimum moments of PC; ``amplitude``: ``[n_orient, H, W]``
        log-Gabor amplitude summed over scales (for the MIM and the orientation).
    """
    eps = 1e-4
    n_or, n_sc = conf["n_orient"], conf["n_scales"]
    spectrum = np.fft.fft2(image.astype(np.float64))
    bank = log_gabor_bank(image.shape, conf)
    eo = np.fft.ifft2(spectrum[None, None] * bank, axes=(-2, -1))  # [O, S, H, W] complex
    amp = np.abs(eo)
    sum_e, sum_o, sum_an = eo.real.sum(1), eo.imag.sum(1), amp.sum(1)  # [O, H, W]
    max_an = amp.max(1)
    x_energy = np.sqrt(sum_e**2 + sum_o**2) + eps
    mean_e, mean_o = sum_e / x_energy, sum_o / x_energy
    energy = (eo.real * mean_e[:, None] + eo.imag * mean_o[:, None]
              - np.abs(eo.real * mean_o[:, None] - eo.imag * mean_e[:, None])).sum(1)
    # noise: Rayleigh statistics from the smallest scale's amplitude, per orientation
    tau = np.median(amp[:, 0].reshape(n_or, -1), axis=1) / np.sqrt(np.log(4))
    radial_sums = np.array([np.abs(bank[0, s]).sum() for s in range(n_sc)])
    total_tau = tau * radial_sums.sum() / radial_sums[0]
    noise_mean = total_tau * np.sqrt(np.pi / 2)
    noise_sigma = total_tau * np.sqrt((4 - np.pi) / 2)
    threshold = np.maximum(noise_mean + conf["k_noise"] * noise_sigma, eps)
    energy = np.maximum(energy - threshold[:, None, None], 0)
    width = (sum_an / (max_an + eps) - 1) / (n_sc - 1)
    weight = 1.0 / (1 + np.exp((conf["cut_off"] - width) * conf["g"]))
    pc = weight * energy / (sum_an + eps)  # [O, H, W]
    angles = np.arange(n_or) * np.pi / n_or
    cx, cy = pc * np.cos(angles)[:, None, None], pc * np.sin(angles)[:, None, None]
    a, b, c = (cx**2).sum(0), 2 * (cx * cy).sum(0), (cy**2).sum(0)
    a, b, c = a / (n_or / 2), b / (n_or / 2), c / (n_or / 2)
    denom = np.sqrt(b**2 + (a - c) ** 2) + eps
    return {"M": (c + a + denom) / 2, "m": (c + a - denom) / 2, "amplitude": sum_an.astype(np.float32)}


def fast_keypoints(pc: dict[str, np.ndarray], valid: np.ndarray, conf: dict[str, Any]) -> np.ndarray:
    """FAST keypoints ``[N, 2]`` (x, y) on the moment maps, strongest ``max_keypoints``, valid pixels only."""
    fast = cv2.FastFeatureDetector_create(conf["fast_threshold"], nonmaxSuppression=True)
    pts, resp = [], []
    for key in ("M", "m"):
        img = pc[key]
        img8 = np.clip(img / (np.percentile(img, 99.5) + 1e-9) * 255, 0, 255).astype(np.uint8)
        kps = fast.detect(img8, None)
        pts.append(np.array([k.pt for k in kps], np.float64).reshape(-1, 2))
        resp.append(np.array([k.response for k in kps], np.float64))
    p, r = np.concatenate(pts), np.concatenate(resp)
    p, idx = np.unique(np.round(p), axis=0, return_index=True)
    r = r[idx]
    keep = in_valid(p, valid, margin=3)
    p, r = p[keep], r[keep]
    return p[np.argsort(-r)[: conf["max_keypoints"]]]


def orientations(amplitude: np.ndarray, points: np.ndarray, sigma: float) -> np.ndarray:
    """Dominant orientation ``[N]`` (rad, in [0, pi)) of the PC structure around each point.

    Doubled-angle mean of the per-orientation amplitudes ``[O, H, W]``, Gaussian-weighted (``sigma`` px).
    Filter ``o`` has its frequency axis at ``o*pi/O`` measured with y up (see :func:`log_gabor_bank`);
    the result is returned in image (x, y-down) angles, i.e. negated, so that it rotates with the image.
    """
    n_or = amplitude.shape[0]
    angles = np.arange(n_or) * np.pi / n_or
    z = (amplitude * np.exp(2j * angles)[:, None, None]).sum(0)
    re = cv2.GaussianBlur(z.real.astype(np.float32), (0, 0), sigma)
    im = cv2.GaussianBlur(z.imag.astype(np.float32), (0, 0), sigma)
    xi = np.clip(np.round(points[:, 0]).astype(int), 0, re.shape[1] - 1)
    yi = np.clip(np.round(points[:, 1]).astype(int), 0, re.shape[0] - 1)
    return np.mod(-np.arctan2(im[yi, xi], re[yi, xi]) / 2, np.pi)


def mim_descriptors(amplitude: np.ndarray, valid: np.ndarray, points: np.ndarray, phi: np.ndarray,
                    conf: dict[str, Any]) -> np.ndarray:
    """MIM histogram descriptors ``[N, grid*grid*n_orient]`` (L2-normalised), rotated by ``phi [N]`` (rad).

    Note: image rows point down, so a counter-clockwise rotation on screen has a negative angle
    in (x, y); both ``phi`` and the filter angles use the same (x, y) convention, so relative angles
    are consistent.
    """
    n_or, grid, ns = conf["n_orient"], conf["grid"], conf["samples"]
    mim = amplitude.argmax(0)  # [H, W] in 0..O-1
    h, w = mim.shape
    u = (np.arange(ns) + 0.5) / ns - 0.5  # [-0.5, 0.5)
    gu, gv = np.meshgrid(u, u)  # sample offsets in patch units
    cell = (np.floor((gv + 0.5) * grid) * grid + np.floor((gu + 0.5) * grid)).astype(int).ravel()  # [G]
    off = np.stack([gu.ravel(), gv.ravel()], -1) * conf["patch"]  # [G, 2]
    c, s = np.cos(phi)[:, None], np.sin(phi)[:, None]
    # angle of the filter-orientation axis in image coordinates is -theta (theta measured with y up)
    x = points[:, :1] + c * off[None, :, 0] - s * off[None, :, 1]
    y = points[:, 1:2] + s * off[None, :, 0] + c * off[None, :, 1]
    xi, yi = np.round(x).astype(int), np.round(y).astype(int)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    xi, yi = np.clip(xi, 0, w - 1), np.clip(yi, 0, h - 1)
    inside &= valid[yi, xi]
    labels = mim[yi, xi]  # [N, G]
    # re-index labels relative to phi: filter angles theta_o = o*pi/O measured with y up = -angle in (x, y)
    shift = np.round(-phi * n_or / np.pi).astype(int)[:, None]
    rel = np.mod(labels - shift, n_or)
    n = len(points)
    bins = (np.arange(n)[:, None] * grid * grid + cell[None]) * n_or + rel
    hist = np.bincount(bins[inside].ravel(), minlength=n * grid * grid * n_or).astype(np.float32)
    desc = hist.reshape(n, -1)
    return desc / (np.linalg.norm(desc, axis=1, keepdims=True) + 1e-9)


def _working(img: PreparedImage, max_side: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Gray float image and mask at long side <= ``max_side``; returns the working->prepared factor."""
    gray = gray_uint8(img).astype(np.float32) / 255.0
    h, w = gray.shape
    f = min(1.0, max_side / max(h, w))
    if f < 1.0:
        size = (round(w * f), round(h * f))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        valid = cv2.resize(img.valid.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        return gray, valid, w / size[0]
    return gray, img.valid, 1.0


class RIFT:
    """RIFT-style detector/descriptor; ``__call__(gray [H, W] float, valid [H, W], both_senses)`` ->
    ``(keypoints [N, 2], descriptors [N', D], owner [N'])`` where ``owner`` maps descriptors to keypoints."""

    def __init__(self, **conf: Any) -> None:
        self.conf = merge_options(default_conf, conf, "RIFT")

    def __call__(self, gray: np.ndarray, valid: np.ndarray, both_senses: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pc = phase_congruency(gray, self.conf)
        kpts = fast_keypoints(pc, valid, self.conf)
        phi = orientations(pc["amplitude"], kpts, self.conf["patch"] / 4)
        owner = np.arange(len(kpts))
        if both_senses:
            phi, owner = np.concatenate([phi, phi + np.pi]), np.concatenate([owner, owner])
        desc = mim_descriptors(pc["amplitude"], valid, kpts[owner], phi, self.conf)
        return kpts, desc, owner


def build_rift(conf: dict[str, Any]) -> MethodFn:
    """RIFT-style features + mutual nearest neighbours (settings: :data:`default_conf`)."""
    import torch

    rift = RIFT(**conf)

    def run(optical: PreparedImage, sar: PreparedImage) -> dict[str, Any]:
        timings: dict[str, float] = {}
        with timed(timings, "features"):
            g0, v0, f0 = _working(optical, conf["max_side"])
            g1, v1, f1 = _working(sar, conf["max_side"])
            k0, d0, o0 = rift(g0, v0, both_senses=False)
            k1, d1, o1 = rift(g1, v1, both_senses=True)
        with timed(timings, "matching"):
            matches, scores = mutual_nearest_neighbours(torch.from_numpy(d0), torch.from_numpy(d1))
        p0 = (k0[o0[matches[:, 0]]] + 0.5) * f0 - 0.5
        p1 = (k1[o1[matches[:, 1]]] + 0.5) * f1 - 0.5
        return output(optical, sar, p0, p1, scores, timings)

    return run


SPEC = MethodSpec("rift", "RIFT-style: phase congruency, FAST, MIM histograms with dominant orientation, MNN",
                  build_rift, dict(default_conf), rotation_invariant=True)
