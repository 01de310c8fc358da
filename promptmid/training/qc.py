"""Calibrate the QC confidence (:mod:`promptmid.qc`) on perturbed training and validation pairs.

The evaluation runner gives, for every pair, the QC evidence of the ``affine+refine`` fit and its true RMSE
(:mod:`promptmid.evaluation.runner`). A logistic regression (L2-regularised, standardised inputs) maps the
evidence to the probability that the RMSE is <= 5 px. Thresholds:

- ``ok_threshold``: the lowest confidence at which the pairs at or above it are right with >= 98 % precision
  (lower bound of a Wilson interval would be stricter; we use the observed precision and report the counts);
- ``fail_threshold``: the highest confidence below which at most 2 % of the pairs are right, and at most
  ``FAIL_CAP`` = 0.05 (a pair is called failed only when the model gives it under 5 %).

Never fit on unseen sources: :func:`calibration_pairs` takes the training split and validation only.

Run: ``python -m promptmid.training.qc --data ../shared/data/optsar --out promptmid/weights/promptmid-qc-v3.json``
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from promptmid.config import SUCCESS_PX
from promptmid.qc import QCModel, feature_vector

PRECISION = 0.98
FAIL_CAP = 0.05
MODEL_NAME = "affine+refine"
# chosen by leave-one-calibration-set-out cross-validation (train-3mos / train-srif / val) among the full set,
# a 9-feature set, the dense features alone, with the correlation at zero shift, and this one: precision of ok
# 0.977, recall 0.78, log-loss 0.152 (full set: 0.961, 0.89, 0.142 with two wrong ok; dense alone: recall 0.67)
MODEL_FEATURES = ("log_dense_offset", "dense_distinctness", "dense_peak", "refine_inlier_ratio", "anisotropy")


def rows_with_evidence(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``affine+refine`` rows that have a transform, QC evidence (keypoint fits and area hypotheses alike) and a
    finite true RMSE."""
    keep = []
    for r in rows:
        if r.get("model") != MODEL_NAME or r.get("status") != "ok" or "qc_dense_peak" not in r:
            continue
        if r.get("rmse") is None or not math.isfinite(float(r["rmse"])):
            continue
        keep.append(r)
    return keep


def evidence_of(row: dict[str, Any]) -> dict[str, float]:
    return {k[3:]: float(v) for k, v in row.items() if k.startswith("qc_") and k not in ("qc_status",
                                                                                      "qc_confidence")}


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 100) -> tuple[np.ndarray, float]:
    """Newton-Raphson logistic regression with an L2 penalty on the coefficients (not the intercept).

    Args:
        x: ``[N, F]`` standardised features; y: ``[N]`` 0/1 labels.

    Returns:
        ``(coef [F], intercept)``.
    """
    n, f = x.shape
    a = np.hstack([x, np.ones((n, 1))])
    w = np.zeros(f + 1)
    reg = np.full(f + 1, l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -30, 30)))
        grad = a.T @ (p - y) + reg * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def thresholds(conf: np.ndarray, y: np.ndarray, precision: float = PRECISION) -> tuple[float, float]:
    """``(ok_threshold, fail_threshold)`` as described in the module docstring."""
    order = np.argsort(-conf)
    c, t = conf[order], y[order]
    prec = np.cumsum(t) / np.arange(1, len(t) + 1)
    good = np.nonzero(prec >= precision)[0]
    ok = float(c[good.max()]) if len(good) else 1.0 + 1e-9
    asc = np.argsort(conf)
    ca, ta = conf[asc], y[asc]
    rate = np.cumsum(ta) / np.arange(1, len(ta) + 1)
    low = np.nonzero(rate <= 1 - precision)[0]
    fail = float(ca[low.max()]) + 1e-9 if len(low) else 0.0
    return ok, min(fail, ok, FAIL_CAP)


def calibrate(rows: Sequence[dict[str, Any]], features: Sequence[str] = MODEL_FEATURES, l2: float = 1.0,
              info: dict[str, Any] | None = None) -> QCModel:
    """Fit the QC model on evaluation rows (see :func:`rows_with_evidence`)."""
    usable = rows_with_evidence(rows)
    if len(usable) < 20:
        raise ValueError(f"only {len(usable)} usable rows; calibration needs at least 20")
    x = np.stack([feature_vector(evidence_of(r), features) for r in usable])
    y = np.array([float(r["rmse"]) <= SUCCESS_PX for r in usable], float)
    if y.min() == y.max():
        raise ValueError("calibration rows are all right or all wrong; need both")
    mean, std = x.mean(0), x.std(0) + 1e-6
    coef, intercept = fit_logistic((x - mean) / std, y, l2)
    model = QCModel(tuple(features), mean, std, coef, intercept, 1.0, 0.0, {})
    conf = np.array([model.confidence(evidence_of(r)) for r in usable])
    ok, fail = thresholds(conf, y)
    stats = verdict_stats(conf, y, ok, fail)
    meta = {"rows": len(usable), "right": int(y.sum()), "success_px": SUCCESS_PX, "precision_target": PRECISION,
            "calibration": stats, **(info or {})}
    return QCModel(tuple(features), mean, std, coef, intercept, ok, fail, meta)


def verdict_stats(conf: np.ndarray, right: np.ndarray, ok: float, fail: float) -> dict[str, Any]:
    """Counts and precision/recall of ``ok`` against the truth (``right`` = within 5 px)."""
    is_ok, is_fail = conf >= ok, conf < fail
    n_ok, n_right = int(is_ok.sum()), int(right.sum())
    return {"ok": n_ok, "uncertain": int((~is_ok & ~is_fail).sum()), "failed": int(is_fail.sum()),
            "ok_precision": float(right[is_ok].mean()) if n_ok else float("nan"),
            "ok_recall": float(right[is_ok].sum() / n_right) if n_right else float("nan"),
            "right_among_failed": int(right[is_fail].sum())}


def calibration_pairs(pairs: list[Any], every_srif: int = 2, max_srif: int = 40
                      ) -> dict[str, tuple[list[Any], list[float]]]:
    """Training 3MOS tiles (no rotation search), the first ``max_srif`` of every ``every_srif``-th training srif
    pair and the validation pairs (rotation search 0/90/180/270), exact/approx ground truth only (the caller
    selects). Never unseen sources."""
    from promptmid.evaluation.methods import FULL_ROTATIONS
    from promptmid.evaluation.split import split_group

    train = [p for p in pairs if split_group(p) == "train"]
    val = [p for p in pairs if split_group(p) == "val" or p.source in ("lnift_matlab", "rift2")]
    return {"train-3mos": ([p for p in train if p.source == "3mos"], [0.0]),
            "train-srif": ([p for p in train if p.source == "srif"][::every_srif][:max_srif], FULL_ROTATIONS),
            "val": (val, FULL_ROTATIONS)}


def main(argv: Sequence[str] | None = None) -> int:
    from promptmid.evaluation.manifest import read_manifest
    from promptmid.evaluation.perturb import Perturbation
    from promptmid.evaluation.pipeline import git_revision, select_pairs
    from promptmid.evaluation.runner import EvalConfig, evaluate

    ap = argparse.ArgumentParser(description="Calibrate the QC confidence on perturbed training + validation pairs.")
    ap.add_argument("--data", type=Path, required=True, help="folder with all.jsonl")
    ap.add_argument("--out", type=Path, required=True, help="QC model JSON to write")
    ap.add_argument("--method", default="promptmid-lite")
    ap.add_argument("--seeds", default="0", help="perturbation seeds, comma-separated")
    ap.add_argument("--cache", default="benchmarks/cache", help="raw-match cache of the evaluation runner")
    ap.add_argument("--rows", type=Path, default=None, help="also write the calibration rows (JSON lines)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    pairs = select_pairs(read_manifest(args.data / "all.jsonl"), qualities=["exact", "approx"])
    rows: list[dict[str, Any]] = []
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        for name, (subset, rotations) in calibration_pairs(pairs).items():
            conf = EvalConfig([args.method], rotations, models=("affine",), cache_dir=args.cache,
                              threads=args.threads, perturb=Perturbation(seed))
            print(f"[calibration] seed {seed} {name}: {len(subset)} pairs", flush=True)
            rows.extend({**r, "calibration_set": name, "seed": seed} for r in evaluate(subset, conf, args.workers))
    if args.rows:
        args.rows.write_text("".join(json.dumps(r, default=float) + "\n" for r in rows))
    info = {"method": args.method, "seeds": seeds, "sets": sorted({r["calibration_set"] for r in rows}),
            "date": datetime.date.today().isoformat(), "commit": git_revision(Path(__file__).parent),
            "command": "python -m promptmid.training.qc " + " ".join(sys.argv[1:] if argv is None else argv)}
    model = calibrate(rows, info=info)
    args.out.write_text(json.dumps(model.to_dict(), indent=1) + "\n")
    print(json.dumps(model.info["calibration"], indent=1))
    print(f"ok_threshold {model.ok_threshold:.3f}, fail_threshold {model.fail_threshold:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
