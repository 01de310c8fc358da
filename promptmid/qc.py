"""Quality control of a fitted transform: independent evidence, a calibrated confidence, a verdict.

Inlier count and residual RMSE are not evidence that a transform is right: descriptors that share a
bias (image position, repetitive fields, flat water) agree with each other on a wrong transform, and a
robust fit can lock onto a degenerate configuration. This stage gathers evidence that does not come
from the fit alone:

- **keypoints**: inliers, inlier ratio, residual RMSE, how much of the overlap the inliers span, whether
  a *competing* transform fits the remaining matches nearly as well, whether the backward fit
  (SAR -> optical, fitted separately) agrees with the forward one, and whether inliers are more similar
  than outliers;
- **area**: agreement of the area-based refinement blocks (:mod:`promptmid.refine`) with the keypoint
  fit, and a dense correlation of oriented-gradient features of the optical image and the SAR image
  warped by the transform over shifts of up to 15 % of the image (:func:`promptmid.alignment.dense_evidence`): its
  peak must sit at zero shift and stand out (a periodic texture registered one period off has a second peak as
  high as the first);
- **plausibility**: anisotropy and shear of the transform, and its scale against the pixel sizes when
  both images are georeferenced.
- **mutual information** (:func:`promptmid.alignment.mutual_information_evidence`, for the pick between candidates in
  :mod:`promptmid.selection`, not for the confidence): how much more the optical and warped SAR intensities depend on
  each other at the transform than a few pixels off — a statistic independent of the gradient channels.

A logistic model over these numbers (coefficients in ``promptmid/weights/promptmid-qc-v3.json``,
fitted on perturbed training and validation pairs only; see :mod:`promptmid.training.qc`) gives
``confidence`` = the probability that the transform is within 5 px RMSE; the status is ``ok`` above
the threshold chosen for >= 98 % precision, ``uncertain`` below it, and ``failed`` when there is no
transform or the confidence is below the failure threshold.

The same evidence and model judge the hypotheses of the global area-based search; :mod:`promptmid.selection`
keeps one result per pair.

Coordinates: ``points0`` optical, ``points1`` SAR, (x, y) pixels of the ORIGINAL images; ``matrix``
maps optical pixels to SAR pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

import cv2
import numpy as np

from promptmid.config import INLIER_THRESHOLD_PX, SUCCESS_PX
from promptmid.errors import ModelError
from promptmid.geometry import Size, apply_transform, corner_error, corners, residuals
from promptmid.io import PreparedImage
from promptmid.matching import Geometry, fit_geometry
from promptmid.refine import Refinement
from promptmid.geo import pixel_size_ratio

STATUSES = ("ok", "uncertain", "failed")
QC_MODEL = Path(__file__).parent / "weights" / "promptmid-qc-v3.json"
QC_MODEL_SHA256 = "6f815bb6995e54fd2c01af596f31dc9bb66083e58b22e833cd8d4e45da39f06f"  # promptmid.training.qc
DENSE_TOLERANCE = 0.01  # a refinement may lower the dense correlation at the transform by this much (noise)

# features of the logistic model: name -> how it is computed from the evidence
FEATURES: dict[str, Any] = {
    "log_inliers": lambda e: math.log1p(e["inliers"]),
    "inlier_ratio": lambda e: e["inlier_ratio"],
    "log_rmse": lambda e: math.log1p(e["rmse_px"]),
    "coverage": lambda e: e["coverage"],
    "competitor_ratio": lambda e: e["competitor_ratio"],
    "log_backward_px": lambda e: math.log1p(min(e["backward_px"], 1e3)),
    "score_margin": lambda e: e["score_margin"],
    "refine_agreement": lambda e: e["refine_agreement"],
    "refine_inlier_ratio": lambda e: e["refine_inlier_ratio"],
    "log_refine_shift": lambda e: math.log1p(min(e["refine_shift_px"], 1e3)),
    "log_dense_offset": lambda e: math.log1p(min(e["dense_offset_px"], 1e3)),
    "dense_distinctness": lambda e: e["dense_distinctness"],
    "dense_peak": lambda e: e["dense_peak"],
    "dense_at_zero": lambda e: e.get("dense_at_zero", 0.0),
    "anisotropy": lambda e: e["anisotropy"],
}


@dataclass
class Verdict:
    """Status, confidence and the evidence behind them.

    Attributes:
        status: ``"ok"`` (trust it), ``"uncertain"`` (a transform exists; check it) or ``"failed"``.
        confidence: calibrated probability in [0, 1] that the transform is within 5 px (0 without one).
        evidence: every number the confidence is computed from (see the module docstring).
        reasons: why the status is not ``ok`` (short phrases, strongest first).
    """

    status: str
    confidence: float
    evidence: dict[str, float] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else round(float(v), 4))
                 for k, v in self.evidence.items()}
        return {"status": self.status, "confidence": round(self.confidence, 4), "reasons": self.reasons,
                "evidence": clean}


# --- evidence ------------------------------------------------------------------------------------


def keypoint_evidence(points0: np.ndarray, points1: np.ndarray, scores: np.ndarray, geom: Geometry,
                      optical_size: Size, sar_size: Size, threshold: float = INLIER_THRESHOLD_PX) -> dict[str, float]:
    """Evidence from the matches and their robust fit (``geom`` must have a matrix).

    Returns:
        ``matches``, ``inliers``, ``inlier_ratio``, ``rmse_px`` (SAR px), ``coverage`` (share of the
        overlap spanned by the inliers' convex hull), ``competitor_ratio`` (inliers of the best fit among
        the outliers / inliers), ``backward_px`` (mean corner distance between the forward fit and the
        inverted SAR -> optical fit, SAR px), ``score_margin`` (mean similarity of inliers minus that of
        outliers), ``anisotropy`` (log of the ratio of the singular values of the linear part),
        ``scale`` (geometric mean of the singular values, SAR px per optical px).
    """
    inl = geom.inliers.astype(bool)
    n, k = len(points0), int(inl.sum())
    rest = fit_geometry(points0[~inl], points1[~inl], geom.model, threshold, min_inliers=1)
    backward = fit_geometry(points1, points0, geom.model, threshold, min_inliers=1)
    return {
        "matches": float(n), "inliers": float(k), "inlier_ratio": k / max(n, 1), "rmse_px": float(geom.rmse),
        "coverage": inlier_coverage(points0[inl], geom.matrix, optical_size, sar_size),
        "competitor_ratio": rest.num_inliers / max(k, 1),
        "backward_px": _backward_disagreement(geom.matrix, backward, optical_size),
        "score_margin": float(np.mean(scores[inl]) - np.mean(scores[~inl])) if 0 < k < n else 0.0,
        **linear_plausibility(geom.matrix),
    }


def linear_plausibility(matrix: np.ndarray) -> dict[str, float]:
    """``anisotropy`` (log of the ratio of the singular values of the linear part) and ``scale`` (their geometric
    mean, SAR px per optical px) of a transform."""
    s = np.linalg.svd(np.asarray(matrix)[:2, :2], compute_uv=False)
    return {"anisotropy": float(np.log(max(s[0], 1e-9) / max(s[1], 1e-9))), "scale": float(np.sqrt(max(s[0] * s[1], 0.0)))}


def inlier_coverage(points0: np.ndarray, matrix: np.ndarray, optical_size: Size, sar_size: Size) -> float:
    """Area of the inliers' convex hull over the area of the overlap (optical px), in [0, 1]."""
    if len(points0) < 3:
        return 0.0
    hull = float(cv2.contourArea(cv2.convexHull(points0.astype(np.float32))))
    sar_in_optical = apply_transform(np.linalg.inv(matrix), corners(sar_size)).astype(np.float32)
    area, _ = cv2.intersectConvexConvex(corners(optical_size).astype(np.float32),
                                        cv2.convexHull(sar_in_optical))
    return float(np.clip(hull / area, 0.0, 1.0)) if area > 0 else 0.0


def _backward_disagreement(matrix: np.ndarray, backward: Geometry, optical_size: Size) -> float:
    """Mean distance (SAR px) between the optical corners mapped by ``matrix`` and by the inverse of the
    separately fitted SAR -> optical transform (infinite when the backward fit fails)."""
    if not backward.ok:
        return float("inf")
    return float(corner_error(matrix, np.linalg.inv(backward.matrix), optical_size).mean())


def refinement_evidence(geom: Geometry, refinement: Refinement | None, points0: np.ndarray, points1: np.ndarray,
                        optical_size: Size, threshold: float = INLIER_THRESHOLD_PX) -> dict[str, float]:
    """How the area-based refinement relates to the keypoint fit.

    Returns:
        ``refine_agreement``: share of the keypoint inliers still within ``2 * threshold`` px of the refined
        transform (1 when refinement did not run or was not applied); ``refine_inlier_ratio``: inliers of the
        block-shift fit over accepted blocks (0 when none); ``refine_shift_px``: mean corner displacement
        between the keypoint fit and the refined transform (SAR px).
    """
    if refinement is None or not refinement.applied:
        blocks = refinement.blocks if refinement is not None else 0
        return {"refine_agreement": 1.0, "refine_inlier_ratio": 0.0, "refine_shift_px": 0.0,
                "refine_blocks": float(blocks)}
    inl = geom.inliers.astype(bool)
    res = residuals(refinement.matrix, points0[inl], points1[inl])
    shift = corner_error(refinement.matrix, geom.matrix, optical_size).mean()
    return {"refine_agreement": float(np.mean(res <= 2 * threshold)) if len(res) else 0.0,
            "refine_inlier_ratio": refinement.inliers / max(refinement.blocks, 1),
            "refine_shift_px": float(shift), "refine_blocks": float(refinement.blocks)}


def refinement_agrees(before: Mapping[str, float], after: Mapping[str, float]) -> tuple[bool, str]:
    """Accept an applied refinement only when the dense correlation over the whole overlap
    (:func:`promptmid.alignment.dense_evidence`, an independent check of the block matching) does not get worse (by
    more than :data:`DENSE_TOLERANCE`) at the transform, and its peak does not move away from the transform.

    Keypoint agreement is deliberately not the criterion: measured on perturbed validation pairs, keypoint fits
    whose inliers agree to 2 px are often 5-20 px off (coarse descriptors share a bias), and the refinement that
    corrects them moves away from those inliers.

    Args:
        before, after: :func:`promptmid.alignment.dense_evidence` of the keypoint fit and of the refined transform.

    Returns:
        ``(accepted, reason)``; ``reason`` says why not.
    """
    if after["dense_at_zero"] < before["dense_at_zero"] - DENSE_TOLERANCE:
        return False, (f"refinement rejected: dense correlation at the transform dropped from "
                       f"{before['dense_at_zero']:.3f} to {after['dense_at_zero']:.3f}")
    if after["dense_offset_px"] > before["dense_offset_px"] + 1.0:
        return False, (f"refinement rejected: dense correlation peak moved from {before['dense_offset_px']:.1f} "
                       f"to {after['dense_offset_px']:.1f} px")
    return True, ""


def pixel_size_evidence(optical: PreparedImage, sar: PreparedImage, scale: float) -> dict[str, float]:
    """``scale_vs_pixel_size``: |log| of the fitted scale over the ratio of the pixel sizes (optical px size /
    SAR px size), when both images carry a georeferenced pixel size in the same CRS units; else absent."""
    ratio = pixel_size_ratio(optical, sar)
    return {} if ratio is None else {"scale_vs_pixel_size": abs(math.log(max(scale, 1e-9) / ratio))}


def gather_evidence(optical: PreparedImage, sar: PreparedImage, points0: np.ndarray, points1: np.ndarray,
                    scores: np.ndarray, geom: Geometry, refinement: Refinement | None,
                    threshold: float = INLIER_THRESHOLD_PX) -> dict[str, float]:
    """The keypoint, refinement and plausibility evidence of a successful keypoint fit ``geom`` and its
    area-based ``refinement`` (``None`` when it did not run); the dense evidence of the transform finally
    kept is added by :func:`assess`."""
    size0, size1 = optical.original_size, sar.original_size
    ev = keypoint_evidence(points0, points1, scores, geom, size0, size1, threshold)
    ev.update(refinement_evidence(geom, refinement, points0, points1, size0, threshold))
    ev.update(pixel_size_evidence(optical, sar, ev["scale"]))
    return ev


# --- confidence and verdict ----------------------------------------------------------------------


@dataclass(frozen=True)
class Logistic:
    """Standardised logistic regression over named features: ``logit(x) = ((x - mean) / std) @ coef + intercept``."""

    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float

    def logit(self, x: np.ndarray) -> np.ndarray:
        """Logits of feature rows ``[..., F]`` (in :attr:`features` order)."""
        return ((np.asarray(x, float) - self.mean) / self.std) @ self.coef + self.intercept

    def core_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "coef": self.coef.tolist(), "intercept": self.intercept}

    @staticmethod
    def core_of(d: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor arguments of the fields above from a JSON dict."""
        return {"features": tuple(d["features"]), "mean": np.asarray(d["mean"], float),
                "std": np.asarray(d["std"], float), "coef": np.asarray(d["coef"], float),
                "intercept": float(d["intercept"])}


@dataclass(frozen=True)
class QCModel(Logistic):
    """Logistic model over :data:`FEATURES` and the two status thresholds (see :mod:`promptmid.training.qc`)."""

    ok_threshold: float = 1.0
    fail_threshold: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    def confidence(self, evidence: Mapping[str, float]) -> float:
        return float(1.0 / (1.0 + np.exp(-self.logit(feature_vector(evidence, self.features)))))

    def to_dict(self) -> dict[str, Any]:
        return {**self.core_dict(), "ok_threshold": self.ok_threshold, "fail_threshold": self.fail_threshold,
                "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QCModel":
        return cls(**cls.core_of(d), ok_threshold=float(d["ok_threshold"]), fail_threshold=float(d["fail_threshold"]),
                   info=dict(d.get("info", {})))


def qc_model_status() -> list[dict[str, Any]]:
    """``promptmid models`` row for the shipped QC model (loaded and checksum-verified)."""
    def load() -> str:
        model = load_qc_model()
        return f"; ok >= {model.ok_threshold:.2f}, failed < {model.fail_threshold:.2f}"

    load_qc_model.cache_clear()
    return pinned_status(QC_MODEL, QC_MODEL_SHA256, "QC confidence (logistic; calibrated on perturbed "
                         "training+validation pairs)", load)


def pinned_status(file: Path, sha256: str | None, message: str, load: Callable[[], Any]) -> list[dict[str, Any]]:
    """``promptmid models`` row for a model file this package ships (sha256 pinned): ``load()`` (which must verify
    it) runs, and its text, if it returns one, is added to ``message``; a :class:`ModelError` marks it not ready."""
    row = {"name": file.stem, "source": "promptmid (this package)", "sha256": (sha256 or "")[:16],
           "licence": "Apache-2.0", "cache_path": str(file), "ready": True, "message": message}
    try:
        extra = load()
        if isinstance(extra, str):
            row["message"] += extra
    except ModelError as exc:
        row.update(ready=False, message=str(exc))
    return [row]


def feature_vector(evidence: Mapping[str, float], names: tuple[str, ...] | list[str]) -> np.ndarray:
    """The logistic model's inputs from an evidence dict (non-finite values clipped)."""
    return np.nan_to_num(np.array([FEATURES[n](evidence) for n in names], float), nan=0.0, posinf=10.0,
                         neginf=-10.0)


def read_pinned_json(file: Path, sha256: str | None, what: str, alternative: str) -> dict[str, Any]:
    """The JSON content of a shipped model file whose sha256 is pinned (``sha256``; ``None``: a user's file, not
    pinned).

    Raises:
        ModelError: the file is missing, does not match ``sha256`` or is not JSON (never read past silently).
    """
    if not file.is_file():
        raise ModelError(f"{what} {file} is missing; reinstall promptmid or pass {alternative} model file.")
    raw = file.read_bytes()
    if sha256 and hashlib.sha256(raw).hexdigest() != sha256:
        raise ModelError(f"{what} {file} does not match its pinned sha256 {sha256[:16]}...; reinstall promptmid.")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"{what} {file} is unreadable: {exc}") from exc


@lru_cache(maxsize=4)
def load_qc_model(path: str | None = None) -> QCModel:
    """The shipped QC model (checksum verified) or one from ``path`` (e.g. a fresh calibration).

    Raises:
        ModelError: missing file, checksum mismatch, or unknown features.
    """
    file = Path(path) if path else QC_MODEL
    data = read_pinned_json(file, None if path else QC_MODEL_SHA256, "QC model", "a calibrated")
    unknown = [n for n in data.get("features", []) if n not in FEATURES]
    if unknown:
        raise ModelError(f"QC model {file} uses unknown features {unknown}; valid: {', '.join(FEATURES)}")
    return QCModel.from_dict(data)


def verdict_of(evidence: Mapping[str, float], model: QCModel | None = None) -> Verdict:
    """Confidence and status of a transform from its evidence (see :func:`gather_evidence`)."""
    model = model or load_qc_model()
    conf = model.confidence(evidence)
    reasons = weak_evidence(evidence)
    if conf >= model.ok_threshold:
        status = "ok"
    elif conf < model.fail_threshold:
        status = "failed"
        reasons.insert(0, f"confidence {conf:.2f} below {model.fail_threshold:.2f}")
    else:
        status = "uncertain"
        reasons.insert(0, f"confidence {conf:.2f} below {model.ok_threshold:.2f}")
    for vetoed, why in vetoes(evidence):
        if status == "ok" and vetoed:
            status = "uncertain"
            reasons.insert(0, why)
    return Verdict(status, conf, dict(evidence), reasons if status != "ok" else [])


AMBIGUOUS = 0.02  # dense distinctness below this rules out ok (right ok fits on the calibration pairs: >= 0.028)


def vetoes(evidence: Mapping[str, float]) -> list[tuple[bool, str]]:
    """Evidence that rules out ``ok`` whatever the confidence (the logistic model is linear and extrapolates):
    the dense correlation peaking more than 2 x 5 px away from the transform (right transforms on the
    calibration pairs peak within 3.4 px), a dense correlation with no distinct peak (distinctness below
    :data:`AMBIGUOUS`: every right ``ok`` fit of the product's candidates on the calibration pairs — training 3MOS
    tiles at two displacement seeds and validation, 116 fits — had at least 0.028, while a hypothesis rotated by
    about 180 degrees on a symmetric validation scene, 220 px off, was called ``ok`` at 0.001), and a scale more
    than 1.5x off the ratio of the pixel sizes."""
    offset = evidence.get("dense_offset_px", 0.0)
    distinct = evidence.get("dense_distinctness", 1.0)
    return [(offset > 2 * SUCCESS_PX, f"dense correlation peaks {offset:.0f} px away from the transform"),
            (distinct < AMBIGUOUS, f"dense correlation has no distinct peak (distinctness {distinct:.3f}: "
                                   "repetitive, symmetric or featureless scene)"),
            (evidence.get("scale_vs_pixel_size", 0.0) > math.log(1.5),
             "scale differs from the ratio of the pixel sizes by more than 1.5x")]


def no_transform(reason: str) -> Verdict:
    """The verdict of a pair without a transform."""
    return Verdict("failed", 0.0, {}, [reason])


def weak_evidence(ev: Mapping[str, float]) -> list[str]:
    """Plain-language flags for the evidence that argues against the transform."""
    flags = []
    if ev.get("dense_offset_px", 0.0) > SUCCESS_PX:
        flags.append(f"dense correlation peaks {ev['dense_offset_px']:.0f} px away from the transform")
    if ev.get("dense_distinctness", 1.0) < AMBIGUOUS:
        flags.append("dense correlation is ambiguous (repetitive or featureless scene)")
    if ev.get("competitor_ratio", 0.0) > 0.5:
        flags.append("another transform fits the remaining matches almost as well")
    if ev.get("backward_px", 0.0) > 2 * SUCCESS_PX:
        flags.append(f"forward and backward fits disagree by {ev['backward_px']:.0f} px")
    if ev.get("coverage", 1.0) < 0.1:
        flags.append("inliers cover less than 10 % of the overlap")
    if ev.get("inliers", 99) < 15:
        flags.append(f"only {int(ev['inliers'])} inliers")
    return flags


def judge(evidence: Mapping[str, float], reason: str = "", model: QCModel | None = None) -> Verdict:
    """:func:`verdict_of` the evidence, or a failed verdict with ``reason`` when there is none (no fit)."""
    return verdict_of(evidence, model) if evidence else no_transform(reason)
