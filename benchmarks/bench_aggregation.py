"""Aggregation ablations on cached features of the real optical-SAR pairs.

Split (../shared/data/optsar/README.md): train = srif 1-180 (not 169) + 3MOS GF3_*/RCM_* (exact/approx
GT; only the pairs whose features were cached when the run started, listed in each run's
summary.json); validation = srif 181-200 (exact/approx), Matcher rotation search [0, 90, 180, 270];
unseen test = a fixed subset (training.data.test_subset) of 3MOS SEN/Redarsat/ALOS/TerraSAR + msg,
vsff, mapglue, rift (exact/approx), rotation [0] only.

    python benchmarks/bench_aggregation.py train full            # one variant -> benchmarks/cache/runs/<variant>
    python benchmarks/bench_aggregation.py report                # evaluate all -> results/aggregation.md

Uses 1 torch thread (the machine is shared).
"""

from __future__ import annotations

import glob
import json
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from promptmid.config import get_config  # noqa: E402
from promptmid.models.aggregation import ConcatFusion, load_aggregator  # noqa: E402
from promptmid.training.data import cache_root, read_manifest, select, test_subset, _safe  # noqa: E402
from promptmid.training.train import TrainConfig, evaluate, train  # noqa: E402

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parents[1] / "shared" / "data" / "optsar"
RUNS = ROOT / "cache" / "runs"  # git-ignored
DINO = ["dinov2_l4", "dinov2_l8", "dinov2_l12"]
ALL = {"xfeat": 64, **{k: 384 for k in DINO}}
VARIANTS = {
    "full": {},
    "no_texture_semantic": {"texture_semantic": False},
    "no_local_global": {"local_global": False},
    "no_xfeat": {"sources": {k: 384 for k in DINO}, "local": None},
    "no_dinov2": {"sources": {"xfeat": 64}},
    "no_dinov2_l12": {"sources": {"xfeat": 64, "dinov2_l4": 384, "dinov2_l8": 384}},
}


def _load(paths: list[str]) -> list[dict]:
    return [torch.load(p, weights_only=True) for p in sorted(paths)]


def entries(split: str) -> list[dict]:
    recs = read_manifest(DATA / "all.jsonl")
    root = cache_root()
    if split == "train":
        ids = {_safe(r.id) for r in select(recs, "train")}
        for ref in (RUNS / "full" / "best.safetensors.json", ROOT / "runs" / "full" / "best.safetensors.json"):
            if ref.is_file():  # ablations use exactly the pairs the full model was trained on
                ids &= {_safe(i) for i in json.loads(ref.read_text())["train_pairs"]}
                break
        return _load([p for p in glob.glob(str(root / "train-*" / "*.pt")) if Path(p).stem in ids])
    wanted = select(recs, "val") if split == "val" else test_subset(recs)
    ids = {_safe(r.id) for r in wanted}
    rot = 4 if split == "val" else 1
    out = []
    for d in glob.glob(str(root / "eval-*")):
        for p in glob.glob(d + "/*.pt"):
            if Path(p).stem in ids:
                e = torch.load(p, weights_only=True)
                if len(e["rotations"]) == rot:
                    out.append(e)
    return sorted(out, key=lambda e: e["id"])


def base_cfg(**kw) -> TrainConfig:
    conf = get_config("lite")
    return TrainConfig(matching=conf["matching"], geometry={k: conf["geometry"][k] for k in ("model", "threshold", "min_inliers")}, **kw)


def run_variant(name: str, epochs: int = 15) -> None:
    tr, va = entries("train"), entries("val")
    print(f"{name}: {len(tr)} training pairs, {len(va)} validation pairs", flush=True)
    model = {"sources": dict(ALL), **VARIANTS[name]}
    cfg = base_cfg(epochs=epochs, model=model, patience=6, seed=0)
    train(tr, va, cfg, RUNS / name, progress=False,
          extra_info={"command": f"python benchmarks/bench_aggregation.py train {name}", "variant": name})


def report() -> None:
    va, te = entries("val"), entries("test")
    cfg = base_cfg()
    methods = {"xfeat only (MNN, no aggregation)": ConcatFusion({"xfeat": 1.0, "dinov2": 0.0}),
               "training-free concat (lite today)": ConcatFusion({"xfeat": 1.0, "dinov2": 0.7})}
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
    lines = ["| method | val success (of %d) | val AUC@5 | val match precision | unseen success (of %d) | unseen AUC@5 | unseen precision | "
             % (len(va), len(te)) + " | ".join(groups) + " |", "|---" * (7 + len(groups)) + "|"]
    for label, r in rows.items():
        v, t = r["val"], r["test"]
        lines.append(f"| {label} | {v['success']} | {v['auc5']:.3f} | {v['precision']:.3f} | {t['success']} | "
                     f"{t['auc5']:.3f} | {t['precision']:.3f} | " + " | ".join(r["groups"].get(g, "-") for g in groups) + " |")
    (ROOT / "results" / "aggregation_table.md").write_text("\n".join(lines) + "\n")


def export(run: Path) -> None:
    """Copy a run's best model to promptmid/weights/promptmid-agg-v1.safetensors (+ sidecar)."""
    from promptmid.models.aggregation import SHIPPED, WEIGHTS_DIR, load_aggregator_file, save_aggregator

    module, meta = load_aggregator_file(run / "best.safetensors")
    info = {k: v for k, v in meta.items() if k not in ("format", "config", "dtype", "file", "sha256")}
    info["name"] = "promptmid-agg-v1"
    info["trained_on"] = "srif pairs (train split) + 3MOS GF3_*/RCM_* tiles, exact/approx GT; see train_pairs"
    save_aggregator(module, WEIGHTS_DIR / SHIPPED["promptmid-agg-v1"], info=info)


if __name__ == "__main__":
    if sys.argv[1] == "export":
        export(Path(sys.argv[2]))
    elif sys.argv[1] == "train":
        run_variant(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 15)
    else:
        report()
