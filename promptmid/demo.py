"""`promptmid demo`: generate a pair with a known transform, register it, compare.

Nothing is downloaded: the pair comes from :mod:`promptmid.synth` and is written to
``OUT/inputs/`` (optical PNG, SAR float32 amplitude GeoTIFF) so that the demo goes
through the same file reading as a user's images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from promptmid.api import Matcher
from promptmid.io import open_for_write, to_uint8, write_png
from promptmid.geometry import corner_error, format_matrix
from promptmid.outputs import prepare_out_dir, write_json
from promptmid.registration import write_products
from promptmid.synth import make_pair


def write_demo_inputs(directory: Path, optical: np.ndarray, sar: np.ndarray) -> tuple[Path, Path]:
    """Write the optical image as PNG and the SAR amplitude as a float32 TIFF."""
    directory.mkdir(parents=True, exist_ok=True)
    opt_path, sar_path = directory / "optical.png", directory / "sar.tif"
    write_png(opt_path, to_uint8(optical))
    profile = {"driver": "GTiff", "width": sar.shape[1], "height": sar.shape[0], "count": 1, "dtype": "float32"}
    with open_for_write(sar_path, profile) as dst:
        dst.write(sar[None])
    return opt_path, sar_path


def run_demo(out: str | Path, preset: str = "lite", seed: int = 7, size: int = 512, overwrite: bool = False,
             quiet: bool = False) -> dict[str, Any]:
    """Run the demo; returns a summary with the true and recovered transforms and the error."""
    out_dir = prepare_out_dir(out, overwrite)
    pair = make_pair(size, seed)
    opt_path, sar_path = write_demo_inputs(out_dir / "inputs", pair.optical, pair.sar)
    matcher = Matcher(preset)
    opt_img, sar_img = matcher.prepare(opt_path, "optical"), matcher.prepare(sar_path, "sar")
    result = matcher.match(opt_img, sar_img)
    write_products(out_dir, result, opt_img, sar_img)
    summary: dict[str, Any] = {"status": result.status, "reason": result.reason, "true_transform": pair.H.tolist(),
                               "estimated_transform": None, "mean_corner_error_px": float("inf")}
    if result.has_transform:
        err = corner_error(result.transform, pair.H, (size, size))
        summary.update(estimated_transform=result.transform.tolist(), mean_corner_error_px=float(err.mean()),
                       max_corner_error_px=float(err.max()))
    summary["text"] = _summary_text(summary, result, out_dir)
    write_json(out_dir / "demo_truth.json", {k: v for k, v in summary.items() if k != "text"})
    return summary


def _summary_text(summary: dict[str, Any], result: Any, out_dir: Path) -> str:
    lines = [f"promptmid demo ({result.config.get('preset')}): generated {out_dir / 'inputs'}",
             "true transform (optical px -> SAR px):", format_matrix(summary["true_transform"], "  "),
             "recovered transform:", format_matrix(summary["estimated_transform"], "  ")]
    if result.has_transform:
        lines.append(f"verdict {result.status} (confidence {result.confidence:.2f}); "
                     f"corner error: mean {summary['mean_corner_error_px']:.2f} px, max {summary['max_corner_error_px']:.2f} px; "
                     f"{result.num_inliers} inliers of {len(result.points0)} matches, RMSE {result.rmse:.2f} px, "
                     f"{result.timings['total']:.1f} s")
    else:
        lines.append(f"registration failed: {result.reason}")
    lines.append(f"outputs: {out_dir}/ (report.html, result.json, tiepoints.csv, matches.png, checkerboard.png, registered_sar.tif)")
    return "\n".join(lines)
