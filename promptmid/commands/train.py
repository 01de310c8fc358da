"""`promptmid train`: train the feature-aggregation module on manifest pairs with known geometry."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from promptmid.commands.common import OverwriteOpt, PresetOpt, QuietOpt, ThreadsOpt, add_command, out_console, set_threads


def register(app: typer.Typer) -> None:
    add_command(app, "train", train_command)


def train_command(
    manifests: List[Path] = typer.Argument(..., help="Manifest(s) (JSON lines with H, README 'Manifest format')."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (log, curves, checkpoints, best weights)."),
    sources: Optional[str] = typer.Option(
        None, "--sources", help="Comma-separated feature keys or groups to fuse, e.g. xfeat,dinov2 or "
        "xfeat,dinov2_l12 (default: all the preset computes)."),
    preset: str = PresetOpt,
    epochs: int = typer.Option(30, "--epochs", help="Maximum epochs (early stopping on validation)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (augmentation, sampling, init)."),
    views: int = typer.Option(2, "--views", help="Views per pair in the feature cache (each a randomly warped, "
                              "augmented optical and SAR image; see --plain-views)."),
    plain_views: bool = typer.Option(False, "--plain-views", help="Old layout: one un-augmented optical image and "
                                     "SAR view 0 as given. Lets the aggregator learn image position: for ablations."),
    perturb_val: Optional[int] = typer.Option(0, "--perturb-val", help="Seed of the displacement applied to every "
                                              "validation SAR image (as `promptmid eval --perturb`); -1 = as given."),
    lr: float = typer.Option(1e-3, "--lr"),
    patience: int = typer.Option(8, "--patience", help="Epochs without validation improvement before stopping."),
    no_texture_semantic: bool = typer.Option(False, "--no-texture-semantic", help="Ablation: drop that block."),
    no_local_global: bool = typer.Option(False, "--no-local-global", help="Ablation: drop that block."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Held-out fraction for manifests without "
                                       "a recommended split (the optsar sources use the README split)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache dir (default $PROMPTMID_CACHE/"
                                         "train_features or benchmarks/cache)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints/last.pt."),
    threads: Optional[int] = ThreadsOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train the aggregation on MANIFEST pairs; the best model is OUT/best.safetensors."""
    from promptmid.config import get_config
    from promptmid.evaluation.perturb import Perturbation
    from promptmid.errors import OutputExistsError
    from promptmid.training.data import FeatureCache, build_cache, read_manifest, split_of
    from promptmid.training.train import OUTPUTS, TrainConfig, remove_outputs, train

    set_threads(threads)
    records = [r for m in manifests for r in read_manifest(m)]  # a bad manifest fails before anything is touched
    if out.exists() and any((out / name).exists() for name in OUTPUTS) and not resume:
        if not overwrite:
            raise OutputExistsError(f"{out} holds a training run; use --overwrite or --resume")
        remove_outputs(out)  # only the files a training run writes; anything else in OUT stays
    good = [r for r in records if r.gt_quality in ("exact", "approx")]
    if any(split_of(r) is not None for r in good):
        train_recs = [r for r in good if split_of(r) == "train"]
        val_recs = [r for r in good if split_of(r) == "val"]
    else:
        n_val = int(round(len(good) * val_fraction)) if len(good) > 1 else 0
        train_recs, val_recs = good[: len(good) - n_val], good[len(good) - n_val:]
    if not train_recs:
        raise ValueError("no training pairs (exact/approx GT of the training split) in the manifests")
    conf = get_config(preset)
    fc = FeatureCache(conf, cache)
    if not quiet:
        out_console.print(f"{len(train_recs)} training pairs, {len(val_recs)} validation pairs; caching features")
    train_entries = build_cache(fc, train_recs, "train", views=views, seed=seed, progress=not quiet,
                                independent=not plain_views)
    displace = None if perturb_val is None or perturb_val < 0 else Perturbation(perturb_val)
    val_entries = build_cache(fc, val_recs, "eval", progress=not quiet, perturb=displace)
    wanted = [s.strip() for s in sources.split(",")] if sources else None
    from promptmid.training.train import infer_sources

    model = {"sources": infer_sources(train_entries[0], wanted), "texture_semantic": not no_texture_semantic,
             "local_global": not no_local_global}
    model["local"] = next((k for k in ("aliked", "xfeat") if k in model["sources"]), None)
    cfg = TrainConfig(epochs=epochs, seed=seed, lr=lr, patience=patience, model=model,
                      matching=conf["matching"], geometry={k: conf["geometry"][k] for k in ("model", "threshold", "min_inliers")})
    summary = train(train_entries, val_entries, cfg, out, resume=resume, progress=not quiet,
                    extra_info={"command": "promptmid train " + " ".join(str(m) for m in manifests), "preset": preset,
                                "views": views, "independent_views": not plain_views,
                                "validation_protocol": "aligned" if displace is None else displace.tag})
    best = summary.get("best") or {}
    out_console.print(f"best epoch {summary['best_epoch']}: " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items()) + f"\nweights: {out / 'best.safetensors'}")
