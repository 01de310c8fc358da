"""Training loop of the aggregator on cached keypoint features.

``OUT`` layout::

    log.jsonl                one JSON object per epoch (loss, accuracy, validation numbers, time)
    curves.png               loss / matching accuracy / validation success per epoch
    checkpoints/last.pt      model + optimiser + RNG + history (for --resume; loaded with weights_only=True)
    best.safetensors(.json)  the best model by validation score (load with load_aggregator(path=...))
    summary.json             settings, data used, best epoch and its validation numbers

Validation each epoch reproduces :meth:`promptmid.api.Matcher.match` on cached features:
descriptors of the optical image and of the SAR image rotated by each step, mutual nearest
neighbours, robust affine fit, best step by inliers; success = mean corner error <= 5 px.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from promptmid.config import INLIER_THRESHOLD_PX, SUCCESS_PX
from promptmid.errors import InputError
from promptmid.evaluation.metrics import auc as auc_curve
from promptmid.evaluation.metrics import mean_corner_error
from promptmid.geometry import Size, apply_transform
from promptmid.io import to_original
from promptmid.matching import match_and_fit, search_rotations
from promptmid.models.aggregation import PromptMIDAggregator, save_aggregator
from promptmid.training.checkpoint import load_module_state, load_state
from promptmid.training.data import gt_correspondences
from promptmid.training.losses import dual_softmax_loss, matching_accuracy

# what a training run writes into OUT (``--overwrite`` removes these and nothing else)
OUTPUTS = ("log.jsonl", "curves.png", "checkpoints", "best.safetensors", "best.safetensors.json", "summary.json")


def remove_outputs(out: Path) -> None:
    """Delete the files of :data:`OUTPUTS` in ``out`` (a previous run's), leaving every other file alone."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            for f in (path / "last.pt", path / "last.pt.tmp"):
                f.unlink(missing_ok=True)
            if not any(path.iterdir()):
                path.rmdir()
        elif path.exists():
            path.unlink()


DescribeFn = Callable[[dict[str, torch.Tensor], torch.Tensor, Size], torch.Tensor]


@dataclass
class TrainConfig:
    """Settings of one training run (all saved in ``summary.json``)."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_pairs: int = 4  # pairs per optimiser step
    max_keypoints: int = 1024  # keypoints per image per step (positives kept first)
    temperature: float = 0.05
    threshold: float = INLIER_THRESHOLD_PX  # px, positives under the GT
    patience: int = 8  # epochs without validation improvement before stopping
    seed: int = 0
    xy_jitter: float = 0.5  # probability of jittering the coordinates fed to the positional encoding
    success_px: float = SUCCESS_PX  # validation success: mean corner error <= this
    model: dict[str, Any] = field(default_factory=dict)  # PromptMIDAggregator options
    matching: dict[str, Any] = field(default_factory=lambda: {"ratio": None, "min_similarity": -1.0})
    geometry: dict[str, Any] = field(default_factory=lambda: {"model": "affine", "threshold": INLIER_THRESHOLD_PX,
                                                                          "min_inliers": 6})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _feats(entry: dict[str, Any], keys: list[str], idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    f = entry["features"]
    return {k: (f[k] if idx is None else f[k][idx]).float() for k in keys}


def _subsample(n: int, keep: torch.Tensor, max_n: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices: ``keep`` first priority, then random others, at most ``max_n``."""
    if n <= max_n:
        return torch.arange(n)
    mask = torch.zeros(n, dtype=torch.bool)
    keep = keep[torch.randperm(len(keep), generator=gen)[:max_n]]
    mask[keep] = True
    rest = torch.nonzero(~mask)[:, 0]
    extra = rest[torch.randperm(len(rest), generator=gen)[: max_n - len(keep)]]
    return torch.sort(torch.cat([keep, extra])).values


def _jitter_xy(kp: torch.Tensor, size: Size, gen: torch.Generator) -> torch.Tensor:
    """Random similarity of the coordinates (about the image centre) seen by the positional encoding."""
    w, h = size
    c = kp.new_tensor([(w - 1) / 2, (h - 1) / 2])
    a = (torch.rand(1, generator=gen).item() - 0.5) * math.radians(40)
    s = math.exp((torch.rand(1, generator=gen).item() - 0.5) * 0.4)
    rot = kp.new_tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * s
    shift = (torch.rand(2, generator=gen) - 0.5) * 0.2 * kp.new_tensor([w, h])
    return (kp - c) @ rot.T + c + shift


def pair_step(model: PromptMIDAggregator, entry: dict[str, Any], cfg: TrainConfig, gen: torch.Generator,
              train: bool = True) -> tuple[torch.Tensor, float, int]:
    """Loss, matching accuracy and number of positives of one cached training pair (random view)."""
    keys = list(model.conf.sources)
    view = entry["views"][int(torch.randint(len(entry["views"]), (1,), generator=gen))] if train else entry["views"][0]
    opt = view.get("optical") or entry["optical"]  # independent views carry their own optical view
    pairs, dist = gt_correspondences(opt["keypoints"], view["keypoints"], view["H"], cfg.threshold)
    i0 = _subsample(len(opt["keypoints"]), pairs[:, 0], cfg.max_keypoints, gen) if train else torch.arange(len(opt["keypoints"]))
    i1 = _subsample(len(view["keypoints"]), pairs[:, 1], cfg.max_keypoints, gen) if train else torch.arange(len(view["keypoints"]))
    # re-index the positives into the subsets
    pos0 = torch.full((len(opt["keypoints"]),), -1, dtype=torch.long)
    pos0[i0] = torch.arange(len(i0))
    pos1 = torch.full((len(view["keypoints"]),), -1, dtype=torch.long)
    pos1[i1] = torch.arange(len(i1))
    p = torch.stack([pos0[pairs[:, 0]], pos1[pairs[:, 1]]], 1) if len(pairs) else pairs
    p = p[(p >= 0).all(1)] if len(p) else p
    kp0, kp1 = opt["keypoints"][i0], view["keypoints"][i1]
    if train and cfg.xy_jitter > 0:
        if torch.rand(1, generator=gen).item() < cfg.xy_jitter:
            kp0 = _jitter_xy(kp0, opt["size"], gen)
        if torch.rand(1, generator=gen).item() < cfg.xy_jitter:
            kp1 = _jitter_xy(kp1, view["size"], gen)
    d0 = model(_feats(opt, keys, i0), kp0, Size(*opt["size"]))
    d1 = model(_feats(view, keys, i1), kp1, Size(*view["size"]))
    loss = dual_softmax_loss(d0, d1, p, dist[i0][:, i1], cfg.temperature)
    return loss, matching_accuracy(d0.detach(), d1.detach(), p), len(p)


@torch.inference_mode()
def evaluate_entry(describe: DescribeFn, entry: dict[str, Any], matching: dict[str, Any],
                   geometry: dict[str, Any]) -> dict[str, Any]:
    """Matcher-equivalent registration of one cached eval pair with descriptor function ``describe``."""
    t0 = time.perf_counter()
    opt = entry["optical"]
    d0 = describe({k: v.float() for k, v in opt["features"].items()}, opt["keypoints"], Size(*opt["size"]))
    H = entry["H"].numpy()
    k0 = to_original(opt["keypoints"].numpy(), entry["opt_scale"])

    def match_at(angle: float) -> tuple[Any, float]:
        rot = entry["rotations"][angle]
        d1 = describe({k: v.float() for k, v in rot["features"].items()}, rot["keypoints"], Size(*rot["size"]))
        k1 = to_original(apply_transform(rot["to_sar"].numpy(), rot["keypoints"].numpy()), entry["sar_scale"])
        cand = match_and_fit(d0, d1, k0, k1, matching, geometry)  # exactly the Matcher's core
        p0, p1 = k0[cand.matches[:, 0]], k1[cand.matches[:, 1]]
        correct = float((np.linalg.norm(apply_transform(H, p0) - p1, axis=1) <= INLIER_THRESHOLD_PX).sum()) if len(p0) else 0.0
        return cand.geometry, correct / max(1, len(p0))

    angle, (geom, precision), _ = search_rotations(entry["rotations"], match_at, lambda trial: trial[0].num_inliers)
    n_in = geom.num_inliers
    err = mean_corner_error(geom.matrix, H, entry["optical_size"])
    return {"id": entry["id"], "group": entry.get("group", ""), "ok": geom.ok, "inliers": n_in,
            "rotation": angle, "corner_error": err, "precision": precision, "time": time.perf_counter() - t0}


def summarize(rows: list[dict[str, Any]], success_px: float = SUCCESS_PX) -> dict[str, float]:
    """Success count and ``corner_sr`` (mean corner error <= ``success_px``; evaluation's ``sr@t`` uses the RMSE),
    AUC@5/10 of the corner error, mean precision."""
    if not rows:
        return {"n": 0, "success": 0, "corner_sr": float("nan"), "auc5": float("nan"), "auc10": float("nan"),
                "precision": float("nan")}
    errs = np.array([r["corner_error"] for r in rows])
    succ = int((errs <= success_px).sum())

    aucs = auc_curve(errs, (SUCCESS_PX, 10.0))  # the evaluation's AUC (area under the recall curve up to t px)
    return {"n": len(rows), "success": succ, "corner_sr": succ / len(rows), "auc5": aucs["auc@5"], "auc10": aucs["auc@10"],
            "precision": float(np.mean([r["precision"] for r in rows]))}


def evaluate(describe: DescribeFn, entries: list[dict[str, Any]], cfg: TrainConfig) -> tuple[dict[str, float], list]:
    rows = [evaluate_entry(describe, e, cfg.matching, cfg.geometry) for e in entries]
    return summarize(rows, cfg.success_px), rows


def infer_sources(entry: dict[str, Any], wanted: list[str] | None) -> dict[str, int]:
    """``{key: channels}`` of the cached features, restricted to ``wanted`` keys/prefixes."""
    feats = (entry.get("optical") or entry["views"][0]["optical"])["features"]
    keys = [k for k in feats if wanted is None or k in wanted or k.split("_")[0] in wanted]
    if not keys:
        raise ValueError(f"none of the sources {wanted} are in the cached features {sorted(feats)}")
    return {k: int(feats[k].shape[1]) for k in keys}


def train(train_entries: list[dict[str, Any]], val_entries: list[dict[str, Any]], cfg: TrainConfig,
          out_dir: str | Path, resume: bool = False, progress: bool = True,
          extra_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a :class:`PromptMIDAggregator` on cached pairs; returns the summary dict.

    Args:
        train_entries: cached training pairs (:meth:`FeatureCache.training_pair`).
        val_entries: cached eval pairs (:meth:`FeatureCache.eval_pair`); may be empty (then the
            training loss decides which checkpoint is best).
        cfg: settings; ``cfg.model`` are the aggregator options (``sources`` inferred if absent).
        out_dir: output directory (see the module docstring).
        resume: continue from ``out_dir/checkpoints/last.pt``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out_dir)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model_conf = dict(cfg.model)
    model_conf.setdefault("sources", infer_sources(train_entries[0], None))
    model = PromptMIDAggregator(**model_conf)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=max(1, cfg.epochs))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    start, best_score, best_epoch = 0, -math.inf, -1
    last = out / "checkpoints" / "last.pt"
    if resume:
        history, start, best_score, best_epoch = _resume(last, model, optim, sched, gen)
    info = {"train_pairs": [e["id"] for e in train_entries], "val_pairs": [e["id"] for e in val_entries],
            **(extra_info or {})}
    bad_epochs = sum(1 for h in history if h["epoch"] > best_epoch)
    last_plot = time.perf_counter()
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[msg]}")]
    with Progress(*cols, disable=not progress) as bar:
        task = bar.add_task("epochs", total=cfg.epochs, completed=start, msg="")
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            losses, accs = _train_epoch(model, optim, train_entries, cfg, gen)
            sched.step()
            row = _epoch_row(model, epoch, losses, accs, optim.param_groups[0]["lr"], val_entries, cfg)
            score = row["score"]
            row["time"] = time.perf_counter() - t0
            history.append(row)
            if score > best_score:
                best_score, best_epoch, bad_epochs = score, epoch, 0
                save_aggregator(model, out / "best.safetensors",
                                info={"epoch": epoch, "validation": {k: v for k, v in row.items()}, **info})
            else:
                bad_epochs += 1
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "sched": sched.state_dict(),
                        "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                        "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch,
                        "model_conf": model.config()}, last)  # read back by _resume
            if time.perf_counter() - last_plot > 60:
                plot_curves(history, out / "curves.png")
                last_plot = time.perf_counter()
            msg = f"loss {row['loss']:.3f} acc {row['train_acc']:.3f}"
            if val_entries:
                msg += f" | val {row['val_success']}/{row['val_n']} prec {row['val_precision']:.3f}"
            bar.update(task, advance=1, msg=msg)
            if bad_epochs >= cfg.patience:
                bar.console.print(f"early stop at epoch {epoch} (best {best_epoch})")
                break
    if history:
        plot_curves(history, out / "curves.png")
    summary = {"config": asdict(cfg) | {"model": model.config()}, "best_epoch": best_epoch,
               "best": next((h for h in history if h["epoch"] == best_epoch), None), "epochs_run": len(history),
               **info}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _resume(last: Path, model: PromptMIDAggregator, optim: torch.optim.Optimizer, sched: Any,
            gen: torch.Generator) -> tuple[list[dict[str, Any]], int, float, int]:
    """Restore model, optimiser, schedule and random states from ``last``; returns ``(history, first epoch to run,
    best score, best epoch)``."""
    if not last.is_file():
        raise InputError(f"--resume: no checkpoint at {last}")
    ck = load_state(last, ("model", "optim", "sched", "gen", "torch_rng", "history", "epoch", "best_score",
                           "best_epoch"))
    load_module_state(model, ck["model"], last)
    optim.load_state_dict(ck["optim"])
    sched.load_state_dict(ck["sched"])
    gen.set_state(ck["gen"])
    torch.set_rng_state(ck["torch_rng"])
    return ck["history"], ck["epoch"] + 1, ck["best_score"], ck["best_epoch"]


def _train_epoch(model: PromptMIDAggregator, optim: torch.optim.Optimizer, entries: list[dict[str, Any]],
                 cfg: TrainConfig, gen: torch.Generator) -> tuple[list[float], list[float]]:
    """One pass over ``entries`` in a random order, ``cfg.batch_pairs`` pairs per step; per-pair losses and
    matching accuracies (pairs without a positive are skipped)."""
    model.train()
    order = torch.randperm(len(entries), generator=gen).tolist()
    losses, accs = [], []
    for b in range(0, len(order), cfg.batch_pairs):
        optim.zero_grad()
        total = torch.zeros(())
        for idx in order[b: b + cfg.batch_pairs]:
            loss, acc, npos = pair_step(model, entries[idx], cfg, gen)
            if npos == 0:
                continue
            total = total + loss / cfg.batch_pairs
            losses.append(float(loss.detach()))
            accs.append(acc)
        if total.requires_grad:
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
    model.eval()
    return losses, accs


def _epoch_row(model: PromptMIDAggregator, epoch: int, losses: list[float], accs: list[float], lr: float,
               val_entries: list[dict[str, Any]], cfg: TrainConfig) -> dict[str, Any]:
    """The log row of an epoch with its validation numbers and ``score`` (validation success + AUC@5 + precision;
    minus the training loss without validation pairs): the best checkpoint has the highest."""
    row: dict[str, Any] = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                           "train_acc": float(np.nanmean(accs)) if accs else float("nan"), "lr": lr}
    if not val_entries:
        return {**row, "score": -row["loss"]}
    with torch.inference_mode():
        val, _ = evaluate(model, val_entries, cfg)
    row.update({f"val_{k}": v for k, v in val.items()})
    return {**row, "score": val["success"] + val["auc5"] + val["precision"]}


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss, training matching accuracy and validation success/precision per epoch."""
    from promptmid.outputs import pyplot

    plt = pyplot()

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    ax[0].plot(ep, [h["loss"] for h in history])
    ax[0].set_title("training loss")
    ax[1].plot(ep, [h["train_acc"] for h in history], label="train MNN acc")
    if "val_precision" in history[0]:
        ax[1].plot(ep, [h["val_precision"] for h in history], label="val match precision")
        ax[2].plot(ep, [h["val_success"] for h in history])
    ax[1].legend()
    ax[1].set_title("accuracy")
    ax[2].set_title("val pairs registered (corner err <= 5 px)")
    for a in ax:
        a.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
