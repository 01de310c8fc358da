"""Registration metrics of README 'Manifest format', all in SAR pixels.

Conventions: ``points0`` are optical, ``points1`` SAR, ``[K, 2]`` (x = column, y = row, pixel
centres at integers); transforms are 3x3 and map optical pixels to SAR pixels. A failed fit
(``estimated is None``) has infinite RMSE and corner error, so it counts in every rate and AUC.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from promptmid.config import INLIER_THRESHOLD_PX, SUCCESS_PX
from promptmid.geometry import Size, apply_transform, corner_error, residuals

EPSILON = INLIER_THRESHOLD_PX  # correctness threshold (SAR px)
MMA_THRESHOLDS = tuple(range(1, 11))  # px
SR_THRESHOLDS = (INLIER_THRESHOLD_PX, SUCCESS_PX)  # success = RMSE <= t
AUC_THRESHOLDS = (INLIER_THRESHOLD_PX, SUCCESS_PX, 10.0)  # AUC of the mean corner error
GRID_STEPS = 10  # RMSE grid: GRID_STEPS x GRID_STEPS points over the optical image


def match_errors(truth: np.ndarray, points0: np.ndarray, points1: np.ndarray) -> np.ndarray:
    """``[K]`` distances ``|H(p0) - p1|`` (SAR px) of matches under the GT ``truth``."""
    if len(points0) == 0:
        return np.zeros(0)
    return residuals(truth, points0, points1)


def ncm(errors: np.ndarray, epsilon: float = EPSILON, mask: np.ndarray | None = None) -> int:
    """Number of correct matches (error <= ``epsilon``), optionally among ``mask`` only."""
    e = errors if mask is None else errors[np.asarray(mask, bool)]
    return int((e <= epsilon).sum())


def mma(errors: np.ndarray, thresholds: Iterable[float] = MMA_THRESHOLDS) -> dict[str, float]:
    """Mean matching accuracy: fraction of matches with error <= t, for each ``t`` (0 without matches)."""
    n = max(1, len(errors))
    return {f"mma@{t:g}": float((errors <= t).sum() / n) for t in thresholds}


def grid_points(size: Size, steps: int = GRID_STEPS) -> np.ndarray:
    """``[steps*steps, 2]`` points spanning the image of ``size = (W, H)`` corner to corner."""
    w, h = size
    xs, ys = np.meshgrid(np.linspace(0, w - 1, steps), np.linspace(0, h - 1, steps))
    return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def transform_rmse(
    estimated: np.ndarray | None, truth: np.ndarray | None, size: Size,
    check_points: np.ndarray | None = None,
) -> float:
    """RMSE (SAR px) of the estimated transform against the GT.

    On the check points ``[P, 4] (xo, yo, xs, ys)`` when given (``|E(po) - ps|``), else on a grid
    of the optical image of ``size = (W, H)`` (``|E(p) - H(p)|``). ``inf`` when ``estimated`` is None.
    """
    if estimated is None:
        return float("inf")
    if check_points is not None and len(check_points):
        d = residuals(estimated, check_points[:, :2], check_points[:, 2:])
    elif truth is not None:
        p = grid_points(size)
        d = np.linalg.norm(apply_transform(estimated, p) - apply_transform(truth, p), axis=1)
    else:
        raise ValueError("transform_rmse needs the GT transform or check points")
    return float(np.sqrt(np.mean(d**2))) if np.isfinite(d).all() else float("inf")


def mean_corner_error(estimated: np.ndarray | None, truth: np.ndarray, size: Size) -> float:
    """Mean distance (SAR px) of the 4 optical corners mapped by ``estimated`` vs ``truth``; inf if failed."""
    if estimated is None:
        return float("inf")
    err = corner_error(estimated, truth, size)
    return float(err.mean()) if np.isfinite(err).all() else float("inf")


def auc(errors: Iterable[float], thresholds: Iterable[float] = AUC_THRESHOLDS) -> dict[str, float]:
    """Area under the cumulative error curve up to each threshold, normalised to [0, 1].

    As in SuperGlue/LightGlue: recall(e) = fraction of pairs with error <= e, integrated over
    ``[0, t]`` and divided by ``t``. Failed pairs are ``inf`` and lower every AUC.
    """
    e = np.sort(np.asarray(list(errors), dtype=np.float64))
    out: dict[str, float] = {}
    for t in thresholds:
        if len(e) == 0:
            out[f"auc@{t:g}"] = float("nan")
            continue
        recall = np.arange(1, len(e) + 1) / len(e)
        x = np.concatenate([[0.0], e])
        y = np.concatenate([[0.0], recall])
        last = int(np.searchsorted(x, t))
        xs = np.concatenate([x[:last], [t]])
        ys = np.concatenate([y[:last], [y[last - 1]]])
        out[f"auc@{t:g}"] = float(np.trapezoid(ys, xs) / t)
    return out


def success_rates(rmses: Iterable[float], thresholds: Iterable[float] = SR_THRESHOLDS) -> dict[str, float]:
    """Fraction of pairs with RMSE <= t (failed pairs have inf RMSE)."""
    r = np.asarray(list(rmses), dtype=np.float64)
    return {f"sr@{t:g}": float((r <= t).mean()) if len(r) else float("nan") for t in thresholds}


def pair_metrics(
    truth: np.ndarray, points0: np.ndarray, points1: np.ndarray, estimated: np.ndarray | None,
    inliers: np.ndarray | None, optical_size: Size, check_points: np.ndarray | None = None,
    epsilon: float = EPSILON,
) -> dict[str, Any]:
    """Every per-pair metric of one fit.

    Args:
        truth: ``[3, 3]`` GT optical -> SAR transform.
        points0, points1: ``[K, 2]`` putative matches (original pixels).
        estimated: ``[3, 3]`` fitted transform or ``None`` (failed).
        inliers: ``[K]`` bool inliers of the fit (``None`` = none).
        optical_size: ``(W, H)`` of the optical image.
        check_points: optional ``[P, 4]`` independent check points.

    Returns:
        ``matches, inliers, ncm_before, ncm_after, cmr, inlier_cmr, mma@1..10, rmse, corner_error``.
    """
    errors = match_errors(truth, points0, points1)
    mask = np.zeros(len(errors), bool) if inliers is None else np.asarray(inliers, bool)
    n_in = int(mask.sum())
    out: dict[str, Any] = {
        "matches": int(len(errors)),
        "inliers": n_in,
        "ncm_before": ncm(errors, epsilon),
        "ncm_after": ncm(errors, epsilon, mask),
    }
    out["cmr"] = out["ncm_before"] / len(errors) if len(errors) else 0.0
    out["inlier_cmr"] = out["ncm_after"] / n_in if n_in else 0.0
    out.update(mma(errors))
    out["rmse"] = transform_rmse(estimated, truth, optical_size, check_points)
    out["corner_error"] = mean_corner_error(estimated, truth, optical_size)
    return out
