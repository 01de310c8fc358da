"""The fit as a record: what a registration estimated, apart from how it is applied.

One :class:`Fit` (transform or scene model, status, confidence, reason, QC evidence, the two pixel grids) is what
``match``, ``scene`` and ``batch`` write into ``result.json`` (:meth:`Fit.to_dict`, the keys every result shares)
and what ``promptmid apply`` reads back (:func:`read_fit`, every field checked), as AROSICS keeps estimating a shift
apart from applying it.

Every transform maps OPTICAL pixel (x, y) -> SAR pixel (x, y), pixel centres at integers, origin top-left; for a
scene, SAR pixels are those of the SAR grid the scene was matched on (the SAR file's, unless ``reprojected``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from promptmid.errors import InputError
from promptmid.geo import Grid

KINDS = ("match", "scene")


@dataclass
class Fit:
    """A fitted result.

    Attributes:
        kind: ``"match"`` or ``"scene"``; status: ``ok``, ``uncertain`` or ``failed``; confidence: QC confidence
            in [0, 1]; reason: why the status is not ``ok``.
        matrix: 3x3 optical px -> SAR px (match: the fit; scene: the affine part of the global model), or ``None``.
        model: the scene's :class:`~promptmid.scene.model.GlobalModel` (``None`` for match).
        optical, sar: the two grids (for a scene, ``sar`` is the SAR file; ``reprojected`` says whether the scene
            matched it through a WarpedVRT in the optical CRS).
        evidence: the QC evidence behind the verdict (names as in :mod:`promptmid.qc`).
        block: the scene's output block side (the same blocks give the same pixels).
    """

    kind: str
    status: str
    matrix: np.ndarray | None
    model: Any
    optical: Grid
    sar: Grid
    confidence: float = 0.0
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    reprojected: bool = False
    block: int = 1024

    @property
    def has_transform(self) -> bool:
        return self.matrix is not None

    def to_dict(self) -> dict[str, Any]:
        """The keys every ``result.json`` shares (``match`` and ``scene`` add their own beside them)."""
        return {"kind": self.kind, "status": self.status, "confidence": float(self.confidence),
                "reason": self.reason,
                "transform": None if self.matrix is None else np.asarray(self.matrix, float).tolist(),
                "global_model": None if self.model is None else self.model.to_dict(),
                "grids": {"optical": self.optical.to_dict(), "sar": self.sar.to_dict(),
                          "reprojected": self.reprojected, "block": self.block}}

    @classmethod
    def from_dict(cls, data: Any, path: str | Path = "result.json") -> "Fit":
        """A fitted result from ``result.json`` content; ``path`` names the file in errors.

        Raises:
            InputError: not a promptmid result, no fitted transform, or a field that is missing or malformed (the
                message names the file and the key).
        """
        path = Path(path)
        if not isinstance(data, dict) or "transform" not in data:
            raise InputError(f"{path} is not a promptmid result.json (no 'transform').")
        if data["transform"] is None:
            raise InputError(f"{path} has no fitted transform (status {data.get('status')!r}: "
                             f"{data.get('reason', '')}).")
        scene = data.get("kind") == "scene" or data.get("global_model") is not None
        model = _scene_model(data.get("global_model"), path) if scene else None
        matrix = checked_transform(model.matrix if scene else data["transform"], path,
                                   "global_model" if scene else "transform")
        optical, sar, reprojected, block = _grids(data, path, scene)
        qc = data.get("qc") if isinstance(data.get("qc"), dict) else {}
        confidence = data.get("confidence")
        return cls("scene" if scene else "match", str(data.get("status")), matrix, model, optical, sar,
                   float(confidence) if isinstance(confidence, (int, float)) else 0.0, str(data.get("reason") or ""),
                   dict(qc.get("evidence") or {}), reprojected, block)


def read_fit(path: str | Path) -> Fit:
    """Read the :class:`Fit` of a ``match`` or ``scene`` ``result.json``.

    Raises:
        InputError: missing or unreadable file, not a promptmid result, no fitted transform, or malformed fields.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"No result file at {path}.") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read {path} as a promptmid result.json ({exc}).") from None
    return Fit.from_dict(data, path)


def checked_transform(value: Any, path: Path, key: str = "transform") -> np.ndarray:
    """``value`` as a usable 3x3 optical px -> SAR px transform, or ``InputError`` naming ``path`` and ``key``: it
    must be a finite 3x3 matrix with a last row that keeps points finite, invertible, with a scale between 1e-4 and
    1e4 (SAR px per optical px) — anything else writes an all-nodata, constant or smeared raster."""
    try:
        m = np.asarray(value, np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: '{key}' is not a numeric 3x3 matrix.") from None
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise InputError(f"{path}: '{key}' must be a finite 3x3 matrix; got shape {m.shape}.")
    if abs(m[2, 2]) < 1e-12:
        raise InputError(f"{path}: '{key}' has a zero last element (points map to infinity).")
    lin = m[:2, :2] / m[2, 2]
    det = float(np.linalg.det(lin))
    if not 1e-8 < abs(det) < 1e8 or abs(np.linalg.det(m)) < 1e-12:
        raise InputError(f"{path}: '{key}' is singular or has an implausible scale (|det| of its linear part "
                         f"{abs(det):.3g}; expected 1e-8..1e8).")
    return m


def _grids(data: dict[str, Any], path: Path, scene: bool) -> tuple[Grid, Grid, bool, int]:
    """``(optical, sar, reprojected, block)`` from ``grids`` (older scene results: the top-level ``optical``,
    ``sar``, ``sar_grid`` and ``config.scene.block``)."""
    grids = data.get("grids")
    if grids is None and scene:
        sar_grid = data.get("sar_grid") if isinstance(data.get("sar_grid"), dict) else {}
        conf = data.get("config") if isinstance(data.get("config"), dict) else {}
        scene_conf = conf.get("scene") if isinstance(conf.get("scene"), dict) else {}
        grids = {"optical": data.get("optical"), "sar": data.get("sar"),
                 "reprojected": sar_grid.get("reprojected_to_optical_crs", False),
                 "block": scene_conf.get("block", 1024)}
    if not grids:
        raise InputError(f"{path} has no 'grids' (written by an older promptmid); rerun it to apply it.")
    if not isinstance(grids, dict):
        raise InputError(f"{path}: 'grids' is not a record of the optical and SAR grids.")
    block = grids.get("block", 1024)
    if not (isinstance(block, int) and not isinstance(block, bool) and 16 <= block <= 65536):
        raise InputError(f"{path}: 'grids.block' must be a whole number of pixels in 16..65536.")
    return (Grid.from_dict(grids.get("optical"), f"{path}: 'grids.optical'"),
            Grid.from_dict(grids.get("sar"), f"{path}: 'grids.sar'"), bool(grids.get("reprojected", False)), block)


def _scene_model(d: Any, path: Path) -> Any:
    """The scene's :class:`~promptmid.scene.model.GlobalModel`, checked (kind, coefficient counts, finite values,
    positive normalisation scale); ``InputError`` naming ``path`` and ``global_model`` otherwise."""
    from promptmid.scene.model import SCENE_MODELS, GlobalModel

    bad = InputError(f"{path}: 'global_model' is malformed (needs kind in {', '.join(SCENE_MODELS)}, coeffs_x and "
                     "coeffs_y of 3 (affine) or 6 (poly2) finite numbers, normalisation cx, cy, scale > 0).")
    try:
        model = GlobalModel.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise bad from None
    n = {"affine": 3, "poly2": 6}.get(model.kind)
    if n is None or model.coeffs.shape != (2, n) or not np.isfinite(model.coeffs).all() \
            or not np.isfinite(model.norm).all() or model.norm[2] <= 0:
        raise bad
    return model
