"""`promptmid train`: train the feature-aggregation module on manifest pairs with known geometry."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from promptmid.commands.common import OverwriteOpt, PresetOpt, QuietOpt, ThreadsOpt, handle_errors, out_console, set_threads


def register(app: typer.Typer) -> None:
    app.command(name="train")(handle_errors(train_command))


def train_command(
    manifests: List[Path] = typer.Argument(..., help="Manifest(s) (JSON lines with H, DESIGN.md §4)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (log, curves, checkpoints, best weights)."),
    sources: Optional[str] = typer.Option(
        None, "--sources", help="Comma-separated feature keys or groups to fuse, e.g. xfeat,dinov2 or "
        "xfeat,dinov2_l12 (default: all the preset computes)."),
    preset: str = PresetOpt,
    epochs: int = typer.Option(30, "--epochs", help="Maximum epochs (early stopping on validation)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (augmentation, sampling, init)."),
    views: int = typer.Option(1, "--views", help="SAR views per pair in the feature cache (view 0 plain, others "
                              "randomly warped + SAR-augmented)."),
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
    import shutil

    from promptmid.config import get_config
    from promptmid.errors import OutputExistsError
    from promptmid.training.data import FeatureCache, build_cache, read_manifest, split_of
    from promptmid.training.train import TrainConfig, train

    set_threads(threads)
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise OutputExistsError(f"{out} exists and is not empty; use --overwrite or --resume")
        shutil.rmtree(out)
    records = [r for m in manifests for r in read_manifest(m)]
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
    train_entries = build_cache(fc, train_recs, "train", views=views, seed=seed, progress=not quiet)
    val_entries = build_cache(fc, val_recs, "eval", progress=not quiet)
    wanted = [s.strip() for s in sources.split(",")] if sources else None
    from promptmid.training.train import infer_sources

    model = {"sources": infer_sources(train_entries[0], wanted), "texture_semantic": not no_texture_semantic,
             "local_global": not no_local_global}
    if "xfeat" not in model["sources"]:
        model["local"] = None
    cfg = TrainConfig(epochs=epochs, seed=seed, lr=lr, patience=patience, model=model,
                      matching=conf["matching"], geometry={k: conf["geometry"][k] for k in ("model", "threshold", "min_inliers")})
    summary = train(train_entries, val_entries, cfg, out, resume=resume, progress=not quiet,
                    extra_info={"command": "promptmid train " + " ".join(str(m) for m in manifests), "preset": preset,
                                "views": views})
    best = summary.get("best") or {}
    out_console.print(f"best epoch {summary['best_epoch']}: " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in best.items()) + f"\nweights: {out / 'best.safetensors'}")
