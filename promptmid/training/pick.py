"""Train the pick's ranker (:func:`promptmid.selection.pick`) on the product's candidates of perturbed training pairs.

For every training 3MOS tile (the calibration set ``train-3mos`` of :func:`promptmid.training.qc.calibration_pairs`,
never unseen sources), displaced with each seed, the default's candidates are built exactly as the product builds
them (the keypoint fit and the hypotheses of both area searches, judged and given their mutual-information evidence
by :func:`promptmid.selection.choose`); pairs whose keypoint fit is already ``ok`` are left out (the product skips
the pick there). Each candidate becomes a row of :func:`promptmid.selection.pick_features` labelled "within 5 px of
the truth", and an L2-regularised logistic regression (standardised inputs) is fitted to them.

Run (about 10 min on 2 cores with the evaluation's search caches):
``python -m promptmid.training.pick --data ../shared/data/optsar --out promptmid/weights/promptmid-pick-v1.json``
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from promptmid.config import SUCCESS_PX

METHOD = "promptmid-lite+area-both-trained"  # the default's candidates (keypoints + both area searches)
L2 = 6.0  # chosen by 5-fold cross-validation grouped by tile over both seeds (candidates of the training 3MOS tiles)


class _Uniform:
    """A ranker that prefers no candidate (the pick is not what the training rows need)."""

    def score(self, x: np.ndarray) -> np.ndarray:
        return np.zeros(len(x))


UNIFORM = _Uniform()


def pair_candidates(args: tuple[Any, int, str, list[float]]) -> dict[str, Any]:
    """The candidates of one perturbed pair (``(pair, seed, cache dir, rotations, method)``; ``method``: an
    evaluation composite, by default :data:`METHOD`): ``{"pair", "seed", "skipped"}`` (the keypoint fit is ok) or with
    ``"features" [n, F]``, ``"right" [n]`` (within 5 px) and ``"sources" [n]``."""
    pair, seed, cache, rotations, method = args
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    from promptmid.config import DEFAULTS
    from promptmid.evaluation import metrics
    from promptmid.evaluation.perturb import Perturbation, perturb_pair
    from promptmid.evaluation.runner import EvalConfig, matches_for
    from promptmid.io import load_image
    from promptmid.matching import fit_geometry
    from promptmid.search import Hypothesis
    from promptmid.selection import choose, keypoint_candidate, pick_features

    conf = EvalConfig([method], list(rotations), models=("affine",), cache_dir=cache, threads=1, perturb=Perturbation(seed))
    moved, sar = perturb_pair(pair, conf.perturb)
    images = (load_image(moved.optical, "optical", max_side=1024), load_image(sar, "sar", max_side=1024))
    out = matches_for(method, moved, images, "", conf)
    geom = fit_geometry(out["points0"], out["points1"], "affine", conf.threshold, conf.min_inliers)
    refine = {k: v for k, v in DEFAULTS["refine"].items() if k != "enabled"}
    kp = keypoint_candidate(images[0], images[1], out["points0"], out["points1"], np.asarray(out["scores"], float),
                            geom, refine, conf.threshold)
    if kp is not None and kp.verdict.status == "ok":
        return {"pair": pair.id, "seed": seed, "skipped": True}
    hyps = [Hypothesis.from_dict(h) for h in out.get("hypotheses", [])]
    _, candidates = choose(images[0], images[1], kp, hyps, refine, "affine", ranker=UNIFORM)  # the candidates only
    truth, size = moved.gt_transform(), images[0].original_size
    right = [metrics.transform_rmse(c.transform, truth, size, moved.points) <= SUCCESS_PX for c in candidates]
    return {"pair": pair.id, "seed": seed, "skipped": False, "features": pick_features(candidates, size),
            "right": np.array(right, float), "sources": [c.source for c in candidates]}


def fit_pick_model(rows: Sequence[dict[str, Any]], l2: float = L2, info: dict[str, Any] | None = None) -> dict:
    """The ranker (the JSON content of ``promptmid-pick-v*.json``) fitted to :func:`pair_candidates` rows."""
    from promptmid.selection import PICK_FEATURES
    from promptmid.training.qc import fit_logistic

    used = [r for r in rows if not r["skipped"] and len(r["right"])]
    x = np.concatenate([r["features"] for r in used])
    y = np.concatenate([r["right"] for r in used])
    if y.min() == y.max():
        raise ValueError("the candidates are all right or all wrong; need both")
    mean, std = x.mean(0), x.std(0) + 1e-6
    coef, intercept = fit_logistic((x - mean) / std, y, l2)
    return {"features": list(PICK_FEATURES), "mean": mean.tolist(), "std": std.tolist(), "coef": coef.tolist(),
            "intercept": intercept, "info": {"pairs": len(used), "candidates": len(y), "right": int(y.sum()),
                                             "l2": l2, "success_px": SUCCESS_PX, **(info or {})}}


def main(argv: Sequence[str] | None = None) -> int:
    from promptmid.evaluation.manifest import read_manifest
    from promptmid.evaluation.pipeline import git_revision, select_pairs
    from promptmid.training.qc import calibration_pairs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/optsar", help="folder with all.jsonl")
    ap.add_argument("--out", default=None, help="JSON file to write (the ranker; training set only)")
    ap.add_argument("--seeds", default="0,1", help="displacement seeds, comma-separated")
    ap.add_argument("--cache", default="benchmarks/cache", help="the evaluation's match cache")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--method", default=METHOD, help="the evaluation composite whose candidates are ranked")
    ap.add_argument("--set", default="train-3mos", choices=("train-3mos", "val"),
                    help="calibration set (training 3MOS tiles; val only to look at, never to fit)")
    ap.add_argument("--rows", default=None, help="also save the candidate rows here (pickle), e.g. to compare l2")
    a = ap.parse_args(argv)
    if not a.out and not a.rows:
        ap.error("nothing to write: give --out (the ranker) and/or --rows (the candidates)")
    if a.out and a.set != "train-3mos":
        ap.error("the ranker is fitted on the training 3MOS tiles only (--set train-3mos)")
    pairs = select_pairs(read_manifest(Path(a.data) / "all.jsonl"), qualities=["exact", "approx"])
    train, rotations = calibration_pairs(pairs)[a.set]
    jobs = [(p, int(s), a.cache, rotations, a.method) for s in a.seeds.split(",") for p in train]
    with ProcessPoolExecutor(a.workers) as ex:
        rows = list(ex.map(pair_candidates, jobs))
    if a.rows:
        import pickle

        Path(a.rows).write_bytes(pickle.dumps(rows))
    if not a.out:
        return 0
    model = fit_pick_model(rows, info={"set": a.set, "seeds": a.seeds, "method": a.method,
                                       "commit": git_revision(Path(__file__).parent),
                                       "date": datetime.date.today().isoformat()})
    Path(a.out).write_text(json.dumps(model, indent=2) + "\n")
    print(json.dumps(model["info"]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
