"""Figures: inlier correspondences and checkerboard overlays."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from promptmid.api import MatchResult  # noqa: E402
from promptmid.io import PreparedImage, write_png  # noqa: E402
from promptmid.geometry import residuals  # noqa: E402


def plot_matches(path: Path, result: MatchResult, opt: PreparedImage, sar: PreparedImage,
                 max_lines: int = 300) -> None:
    """Optical and SAR side by side with inlier matches coloured by residual (SAR px)."""
    inl = result.inliers
    p0 = (result.points0[inl] + 0.5) / np.asarray(opt.scale) - 0.5
    p1 = (result.points1[inl] + 0.5) / np.asarray(sar.scale) - 0.5
    res = residuals(result.transform, result.points0[inl], result.points1[inl]) if result.ok else np.zeros(len(p0))
    if len(p0) > max_lines:
        keep = np.random.default_rng(0).choice(len(p0), max_lines, replace=False)
        p0, p1, res = p0[keep], p1[keep], res[keep]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.4))
    for ax, img, title in zip(axes, (opt.image, sar.image), ("optical", "SAR")):
        ax.imshow(img, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    cmap = plt.get_cmap("viridis")
    thr = max(float(result.config.get("geometry", {}).get("threshold", 3.0)), 1e-6)
    for a, b, r in zip(p0, p1, res):
        con = matplotlib.patches.ConnectionPatch(xyA=a, xyB=b, coordsA="data", coordsB="data", axesA=axes[0],
                                                 axesB=axes[1], color=cmap(min(r / thr, 1.0)), lw=0.6, alpha=0.8)
        fig.add_artist(con)
    axes[0].scatter(p0[:, 0], p0[:, 1], s=3, c="yellow")
    axes[1].scatter(p1[:, 0], p1[:, 1], s=3, c="yellow")
    fig.suptitle(f"{result.num_inliers} inliers / {len(result.points0)} matches, RMSE {result.rmse:.2f} px, "
                 f"{result.model}, SAR rotation {result.rotation_deg:g} deg (colour: residual 0..{thr:g} px)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_checkerboard(path: Path, result: MatchResult, opt: PreparedImage, sar: PreparedImage,
                      tiles: int = 8) -> None:
    """SAR warped onto the optical grid (working resolution), interleaved with the optical image."""
    from promptmid.io import working_transform
    from promptmid.registration import checkerboard, warp_to_optical

    h, w = opt.image.shape[:2]
    warped = warp_to_optical(sar.image, working_transform(result.transform, opt, sar), (w, h))
    write_png(path, checkerboard(opt.image, warped, tiles))
