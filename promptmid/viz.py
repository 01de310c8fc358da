"""Figures: inlier correspondences and checkerboard overlays."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from promptmid.config import INLIER_THRESHOLD_PX
from promptmid.geometry import checkerboard, residuals, warp_to_optical
from promptmid.geometry import working_transform
from promptmid.io import PreparedImage, write_png

if TYPE_CHECKING:
    from promptmid.api import MatchResult


def plot_matches(path: Path, result: MatchResult, opt: PreparedImage, sar: PreparedImage,
                 max_lines: int = 300) -> None:
    """Optical and SAR side by side with inlier matches coloured by residual (SAR px)."""
    inl = result.inliers
    p0 = (result.points0[inl] + 0.5) / np.asarray(opt.scale) - 0.5
    p1 = (result.points1[inl] + 0.5) / np.asarray(sar.scale) - 0.5
    res = residuals(result.transform, result.points0[inl], result.points1[inl]) if result.has_transform else np.zeros(len(p0))
    if len(p0) > max_lines:
        keep = np.random.default_rng(0).choice(len(p0), max_lines, replace=False)
        p0, p1, res = p0[keep], p1[keep], res[keep]
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import ConnectionPatch

    # a bare Figure on an Agg canvas: no pyplot import, no figure manager to close, and the layout gets the
    # canvas's renderer instead of a throw-away draw
    fig = Figure(figsize=(12, 6.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for ax, img, title in zip(axes, (opt.image, sar.image), ("optical", "SAR")):
        ax.imshow(img, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    cmap = colormaps["viridis"]
    thr = max(float(result.config.get("geometry", {}).get("threshold", INLIER_THRESHOLD_PX)), 1e-6)
    for a, b, r in zip(p0, p1, res):
        con = ConnectionPatch(xyA=a, xyB=b, coordsA="data", coordsB="data", axesA=axes[0],
                                                 axesB=axes[1], color=cmap(min(r / thr, 1.0)), lw=0.6, alpha=0.8)
        fig.add_artist(con)
    axes[0].scatter(p0[:, 0], p0[:, 1], s=3, c="yellow")
    axes[1].scatter(p1[:, 0], p1[:, 1], s=3, c="yellow")
    colour = {"ok": "green", "uncertain": "darkorange"}.get(result.status, "red")
    fig.suptitle(f"verdict {result.status.upper()} (confidence {result.confidence:.2f})\n"
                 f"{result.num_inliers} inliers / {len(result.points0)} matches, RMSE {result.rmse:.2f} px, "
                 f"{result.model}, SAR rotation {result.rotation_deg:g} deg (colour: residual 0..{thr:g} px)",
                 color=colour)
    fig.tight_layout()
    fig.set_layout_engine("none")  # laid out above: savefig need not lay out (and draw every line) once more
    fig.savefig(path, dpi=100)


def save_checkerboard(path: Path, result: MatchResult, opt: PreparedImage, sar: PreparedImage,
                      tiles: int = 8) -> None:
    """SAR warped onto the optical grid (working resolution), interleaved with the optical image."""
    h, w = opt.image.shape[:2]
    warped = warp_to_optical(sar.image, working_transform(result.transform, opt, sar), (w, h))
    write_png(path, checkerboard(opt.image, warped, tiles))
