"""The global scene model (affine or 2nd-order polynomial) fitted to the merged tie points."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from promptmid.config import INLIER_THRESHOLD_PX
from promptmid.errors import InputError
from promptmid.matching import fit_geometry

SCENE_MODELS = ("affine", "poly2")


@dataclass
class GlobalModel:
    """Optical px -> SAR px model of a whole scene.

    Attributes:
        kind: ``"affine"`` or ``"poly2"``.
        coeffs: ``[2, K]`` coefficients of (1, u, v[, u^2, uv, v^2]) for SAR x and y, where
            ``u = (x - cx) / s``, ``v = (y - cy) / s`` are normalised optical pixels.
        norm: ``(cx, cy, s)``.
    """

    kind: str
    coeffs: np.ndarray
    norm: tuple[float, float, float]

    def apply(self, points: np.ndarray) -> np.ndarray:
        """``[N, 2]`` optical px -> ``[N, 2]`` SAR px."""
        return _design(np.asarray(points, np.float64).reshape(-1, 2), self.kind, self.norm) @ self.coeffs.T

    @property
    def matrix(self) -> np.ndarray:
        """3x3 affine part (exact for ``affine``; the tangent at the scene centre for ``poly2``)."""
        cx, cy, s = self.norm
        c = self.coeffs[:, :3]
        lin = np.array([[c[0, 1] / s, c[0, 2] / s], [c[1, 1] / s, c[1, 2] / s]])
        off = c[:, 0] - lin @ np.array([cx, cy])
        return np.vstack([np.hstack([lin, off[:, None]]), [0, 0, 1.0]])

    def to_dict(self) -> dict[str, Any]:
        terms = ["1", "u", "v"] + (["u^2", "u*v", "v^2"] if self.kind == "poly2" else [])
        return {"kind": self.kind, "terms": terms, "coeffs_x": self.coeffs[0].tolist(), "coeffs_y": self.coeffs[1].tolist(),
                "normalisation": {"cx": self.norm[0], "cy": self.norm[1], "scale": self.norm[2],
                                  "u": "(x - cx) / scale", "v": "(y - cy) / scale"}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GlobalModel":
        """The model from its :meth:`to_dict` form (``result.json`` key ``global_model``)."""
        norm = d["normalisation"]
        return cls(d["kind"], np.array([d["coeffs_x"], d["coeffs_y"]], np.float64),
                   (float(norm["cx"]), float(norm["cy"]), float(norm["scale"])))


def _design(p: np.ndarray, kind: str, norm: tuple[float, float, float]) -> np.ndarray:
    u, v = (p[:, 0] - norm[0]) / norm[2], (p[:, 1] - norm[1]) / norm[2]
    cols = [np.ones_like(u), u, v] + ([u * u, u * v, v * v] if kind == "poly2" else [])
    return np.stack(cols, axis=1)


def fit_global(p0: np.ndarray, p1: np.ndarray, kind: str = "affine", threshold: float = INLIER_THRESHOLD_PX, min_inliers: int = 6,
               max_rounds: int = 10) -> tuple[GlobalModel | None, np.ndarray, str]:
    """Robust scene fit: MAGSAC affine (:func:`fit_geometry`), then least squares with residual rejection.

    Each round refits on the current inliers and keeps points with residual below
    ``min(threshold, max(1, 3 * robust sigma))`` (SAR px) until the set is stable.

    Returns:
        ``(model or None, inliers [N] bool, reason)``.
    """
    if kind not in SCENE_MODELS:
        raise InputError(f"Unknown scene model {kind!r}; valid: {', '.join(SCENE_MODELS)}")
    geom = fit_geometry(p0, p1, "affine", threshold, min_inliers)
    if not geom.ok:
        return None, geom.inliers, geom.reason
    need = max(min_inliers, 12 if kind == "poly2" else 3)
    if geom.num_inliers < need:
        return None, geom.inliers, f"only {geom.num_inliers} inliers; {kind} needs at least {need}"
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    lo, hi = p0[geom.inliers].min(0), p0[geom.inliers].max(0)
    norm = (float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2), float(max(np.max(hi - lo) / 2, 1.0)))
    mask = geom.inliers.copy()
    for _ in range(max_rounds):
        a = _design(p0[mask], kind, norm)
        coeffs = np.linalg.lstsq(a, p1[mask], rcond=None)[0].T
        res = np.linalg.norm(_design(p0, kind, norm) @ coeffs.T - p1, axis=1)
        sigma = 1.4826 * np.median(res[mask])
        new = res < min(threshold, max(1.0, 3 * sigma))
        if new.sum() < need or np.array_equal(new, mask):
            break
        mask = new
    return GlobalModel(kind, coeffs, norm), mask, ""
