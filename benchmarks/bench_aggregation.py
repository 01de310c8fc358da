"""Aggregation ablations on cached features of the real optical-SAR pairs, on the displaced protocol.

Split (../shared/data/optsar/README.md): train = srif 1-180 (not 169) + 3MOS GF3_*/RCM_* (exact/approx
GT), views with independent random warps of both images (position never predicts correspondence);
validation = srif 181-200 (exact/approx), every SAR displaced as ``promptmid eval --perturb 0`` does,
Matcher rotation search [0, 90, 180, 270]; unseen test = a fixed subset (training.data.test_subset) of
3MOS SEN/Redarsat/ALOS/TerraSAR + msg, vsff, mapglue, rift (exact/approx), displaced the same way,
rotation [0] only. Features of the ``lite`` preset (ALIKED + DINOv2 L4/8/12).

    python benchmarks/bench_aggregation.py train full            # one variant -> benchmarks/cache/runs/<variant>
    python benchmarks/bench_aggregation.py report                # evaluate all -> results/aggregation.md

Features are cached in $PROMPTMID_CACHE/train_features (default ~/.cache/promptmid). Uses 1 torch thread.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from promptmid.config import get_config  # noqa: E402
from promptmid.evaluation.perturb import Perturbation  # noqa: E402
from promptmid.models.aggregation import ConcatFusion, load_aggregator  # noqa: E402
from promptmid.training.data import (  # noqa: E402
    ROTATION_STEPS, FeatureCache, build_cache, read_manifest, select, test_subset,
)
from promptmid.training.train import TrainConfig, evaluate, train  # noqa: E402

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parents[1] / "shared" / "data" / "optsar"
RUNS = ROOT / "cache" / "runs"  # git-ignored
PRESET = "lite"
SEED = 0  # perturbation seed of validation and test
DINO = ["dinov2_l4", "dinov2_l8", "dinov2_l12"]
ALL = {"aliked": 128, **{k: 384 for k in DINO}}
VARIANTS = {
    "full": {"local_global": False},
    "with_local_global": {},
    "no_texture_semantic": {"texture_semantic": False, "local_global": False},
    "no_local": {"sources": {k: 384 for k in DINO}, "local": None, "local_global": False},
    "no_dinov2": {"sources": {"aliked": 128}, "local_global": False},
}


def entries(split: str) -> list[dict]:
    """Cached features of one split (computed on first use): training views, or displaced eval pairs."""
    recs = read_manifest(DATA / "all.jsonl")
    cache = FeatureCache(get_config(PRESET))
    if split == "train":
        return build_cache(cache, select(recs, "train"), "train", views=2, seed=0, independent=True)
    wanted = select(recs, "val") if split == "val" else test_subset(recs)
    rotations = ROTATION_STEPS if split == "val" else (0.0,)
    return build_cache(cache, wanted, "eval", rotations=rotations, perturb=Perturbation(SEED))


def base_cfg(**kw) -> TrainConfig:
    conf = get_config("lite")
    return TrainConfig(matching=conf["matching"], geometry={k: conf["geometry"][k] for k in ("model", "threshold", "min_inliers")}, **kw)


def run_variant(name: str, epochs: int = 15) -> None:
    tr, va = entries("train"), entries("val")
    print(f"{name}: {len(tr)} training pairs, {len(va)} validation pairs", flush=True)
    model = {"sources": dict(ALL), "local": "aliked", **VARIANTS[name]}
    cfg = base_cfg(epochs=epochs, model=model, patience=6, seed=0)
    train(tr, va, cfg, RUNS / name, progress=False,
          extra_info={"command": f"python benchmarks/bench_aggregation.py train {name}", "variant": name})


def report() -> None:
    va, te = entries("val"), entries("test")
    cfg = base_cfg()
    methods = {"aliked only (MNN, no aggregation)": ConcatFusion({"aliked": 1.0, "dinov2": 0.0}),
               "training-free concat (lite today)": ConcatFusion({"aliked": 1.0, "dinov2": 0.7})}
    for name in VARIANTS:
        if (RUNS / name / "best.safetensors").is_file():
            methods[f"trained: {name}"] = load_aggregator(name, path=str(RUNS / name / "best.safetensors"))
    rows = {}
    for label, agg in methods.items():
        t0 = time.time()
        sv, _ = evaluate(agg, va, cfg)
        st, per = evaluate(agg, te, cfg)
        groups = {}
        for r in per:
            g = r["group"]
            groups.setdefault(g, []).append(r["corner_error"] <= 5.0)
        rows[label] = {"val": sv, "test": st, "groups": {g: f"{sum(v)}/{len(v)}" for g, v in groups.items()}}
        print(label, sv, st, f"{time.time() - t0:.0f}s", flush=True)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "aggregation.json").write_text(json.dumps(rows, indent=2))
    groups = sorted({g for r in rows.values() for g in r["groups"]})
    head = [f"Displaced protocol (perturbation seed {SEED}); features of preset {PRESET}; success = mean corner "
            "error <= 5 px before refinement.", ""]
    lines = ["| method | val success (of %d) | val AUC@5 | val match precision | unseen success (of %d) | unseen AUC@5 | unseen precision | "
             % (len(va), len(te)) + " | ".join(groups) + " |", "|---" * (7 + len(groups)) + "|"]
    for label, r in rows.items():
        v, t = r["val"], r["test"]
        lines.append(f"| {label} | {v['success']} | {v['auc5']:.3f} | {v['precision']:.3f} | {t['success']} | "
                     f"{t['auc5']:.3f} | {t['precision']:.3f} | " + " | ".join(r["groups"].get(g, "-") for g in groups) + " |")
    sys.path.insert(0, str(ROOT))
    from common import header_lines

    (ROOT / "results" / "aggregation.md").write_text(
        "\n".join(header_lines("Aggregation ablations (displaced protocol)", threads=1) + head + lines) + "\n")


def export(run: Path, name: str) -> None:
    """Copy a run's best model to promptmid/weights/<name>.safetensors (+ sidecar); ``name`` must be in SHIPPED."""
    from promptmid.models.aggregation import SHIPPED, WEIGHTS_DIR, load_aggregator_file, save_aggregator

    module, meta = load_aggregator_file(run / "best.safetensors")
    info = {k: v for k, v in meta.items() if k not in ("format", "config", "dtype", "file", "sha256")}
    info["name"] = name
    info["trained_on"] = "srif pairs (train split) + 3MOS GF3_*/RCM_* tiles, exact/approx GT; see train_pairs"
    save_aggregator(module, WEIGHTS_DIR / SHIPPED[name], info=info)


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export(Path(sys.argv[2]), sys.argv[3])
    elif sys.argv[1] == "train":
        run_variant(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 15)
    else:
        report()
