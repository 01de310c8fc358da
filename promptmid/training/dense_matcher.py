"""Train the coarse dense matcher (:mod:`promptmid.models.dense_matcher`) on frozen DINOv2 tokens.

- data: training-split pairs (exact/approx GT), ``views`` per pair, each an independently warped optical view
  (:func:`promptmid.training.data.make_optical_view`) and an independently warped SAR view with SAR radiometry
  (:func:`promptmid.training.data.make_view`), so where a cell sits in its image never predicts its match. DINOv2
  tokens of both views (position-free, :data:`promptmid.models.dense_matcher.BACKBONE`) are computed once and cached
  in memory (float16): the backbone is frozen, an epoch only runs the matcher.
- loss: the dual-softmax probability of the true cell (the SAR cell nearest to where the truth maps each valid
  optical cell's centre), negative log, averaged over the optical cells whose match lies inside the SAR view.
- selection: validation pairs only (srif validation + near-domain), views drawn with a fixed seed:
  :func:`coarse_precision` (mutual matches within one cell of the truth) and the count of views whose affine fit
  from the matches lands within ``VIEW_HIT_PX`` of the truth (the quantity the pick needs).

Run: ``python -m promptmid.training.dense_matcher --data ../shared/data/optsar --out promptmid/weights/promptmid-dense-v1.safetensors``
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from promptmid.config import get_config
from promptmid.evaluation.manifest import Pair

VIEW_HIT_PX = 8.0  # an affine fit within this mean corner error (view px) of the truth counts as a hit


def view_item(opt: Any, sar: Any, H: np.ndarray, backbone: Any, rng: np.random.Generator | None) -> dict[str, Any]:
    """Tokens of one (optical view, SAR view) of a pair and the truth between them.

    ``H``: optical working px -> SAR working px. ``rng=None``: the images as they are (the SAR's best 90-degree step
    applied). Returns ``{"opt", "sar": [1, C, h, w] float16 tokens, "opt_valid", "sar_valid": [h, w] bool,
    "H": optical view px -> SAR view px, "opt_size", "sar_size": (W, H) view px}``."""
    from promptmid.models.dense_matcher import cell_validity
    from promptmid.training.data import make_optical_view, make_view

    if rng is None:
        opt_view, A = opt, np.eye(3)
    else:
        opt_view, A = make_optical_view(opt, rng)
    sar_view, H_view = make_view(sar, H, rng)
    item = {"H": H_view @ np.linalg.inv(A)}
    for key, view in (("opt", opt_view), ("sar", sar_view)):
        tokens = backbone(view)
        item[key] = tokens.half()
        item[f"{key}_valid"] = cell_validity(view.valid, tokens.shape[-2:])
        item[f"{key}_size"] = (view.image.shape[1], view.image.shape[0])
    return item


def build_items(records: Sequence[Pair], views: int, seed: int, augment: bool = True, synthetic: bool = False
                ) -> list[dict[str, Any]]:
    """:func:`view_item` ``views`` times per record (seeded), the backbone loaded once. ``synthetic``: the SAR image
    is replaced by a pseudo-SAR made from the record's own optical image
    (:func:`promptmid.training.search_head.pseudo_sar`: non-monotonic intensity remap, gamma, blur, speckle) with
    an exact identity truth, before the views are drawn."""
    from rich.progress import track

    from promptmid.io import load_image
    from promptmid.models.dense_matcher import Backbone
    from promptmid.training.data import working_gt

    io_conf = get_config("lite")["io"]
    backbone = Backbone()
    rng = np.random.default_rng(seed)
    out = []
    for rec in track(records, description=f"dense views ({views} per pair)"):
        opt = load_image(rec.optical, "optical", **io_conf)
        if synthetic:
            sar, H = pseudo_sar_of(opt, rng), np.eye(3)
        else:
            sar = load_image(rec.sar, "sar", **io_conf)
            H = working_gt(rec.H, opt, sar)
        for _ in range(views):
            item = view_item(opt, sar, H, backbone, rng if augment else None)
            item["id"] = rec.id
            out.append(item)
    return out


def pseudo_sar_of(opt: Any, rng: np.random.Generator) -> Any:
    """A prepared pseudo-SAR image on the optical image's own pixels (identity truth)."""
    import dataclasses

    from promptmid.training.search_head import pseudo_sar

    gray = pseudo_sar(opt.image.mean(-1), opt.valid, rng)
    gray = np.clip(gray / max(float(np.percentile(gray[opt.valid], 99)) if opt.valid.any() else 1.0, 1e-6), 0, 1)
    return dataclasses.replace(opt, image=np.repeat(gray[..., None], 3, -1).astype(np.float32), modality="sar")


def cell_targets(item: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Optical cell indices and the SAR cell each one's centre falls in under the truth (both valid; row-major)."""
    from promptmid.geometry import apply_transform
    from promptmid.models.dense_matcher import cell_centres

    (gh0, gw0), (gh1, gw1) = item["opt"].shape[-2:], item["sar"].shape[-2:]
    mapped = apply_transform(item["H"], cell_centres((gh0, gw0), item["opt_size"]))
    j = np.floor((mapped[:, 0] + 0.5) * gw1 / item["sar_size"][0]).astype(int)
    i = np.floor((mapped[:, 1] + 0.5) * gh1 / item["sar_size"][1]).astype(int)
    inside = (i >= 0) & (i < gh1) & (j >= 0) & (j < gw1) & item["opt_valid"].reshape(-1)
    inside[inside] &= item["sar_valid"][i[inside], j[inside]]
    idx0 = np.flatnonzero(inside)
    return torch.from_numpy(idx0), torch.from_numpy(i[idx0] * gw1 + j[idx0])


def forward(model: Any, item: dict[str, Any]) -> torch.Tensor:
    """:class:`~promptmid.models.dense_matcher.DenseMatcher` on a cached view, on the model's device; log
    probabilities on the CPU."""
    device = next(model.parameters()).device
    return model(item["opt"].to(device), item["sar"].to(device), torch.from_numpy(item["opt_valid"]).to(device),
                 torch.from_numpy(item["sar_valid"]).to(device)).cpu()


def item_loss(model: Any, item: dict[str, Any]) -> torch.Tensor | None:
    """Mean negative log dual-softmax probability of the true cells (``None``: fewer than 8 cells overlap)."""
    idx0, idx1 = cell_targets(item)
    if len(idx0) < 8:
        return None
    return true_cell_nll(forward(model, item), idx0, idx1)


def true_cell_nll(log_p: torch.Tensor, idx0: torch.Tensor, idx1: torch.Tensor) -> torch.Tensor:
    """Mean negative log probability of the cell pairs ``(idx0, idx1)`` (:func:`cell_targets`), each capped at 30."""
    return -log_p[idx0, idx1].clamp_min(-30.0).mean()


@torch.no_grad()
def evaluate(model: Any, items: Sequence[dict[str, Any]], threshold: float = 0.2) -> dict[str, float]:
    """Validation numbers: the loss (as :func:`item_loss`), mutual matches, their precision (the SAR cell within one cell of the truth), and the views
    whose affine fit of the matches is within ``VIEW_HIT_PX`` and 2x that (mean corner error, SAR view px)."""
    from promptmid.geometry import Size, apply_transform, corner_error
    from promptmid.matching import fit_geometry
    from promptmid.models.dense_matcher import MIN_MATCHES, cell_centres, mutual_matches

    matches = right = hits = hits2 = 0
    losses = []
    for item in items:
        log_p = forward(model, item)
        idx0, idx1 = cell_targets(item)
        if len(idx0):
            losses.append(float(true_cell_nll(log_p, idx0, idx1)))
        i0, i1, _ = mutual_matches(log_p, threshold)
        (gh0, gw0), (gh1, gw1) = item["opt"].shape[-2:], item["sar"].shape[-2:]
        p0 = cell_centres((gh0, gw0), item["opt_size"])[i0]
        p1 = cell_centres((gh1, gw1), item["sar_size"])[i1]
        cell = max(item["sar_size"]) / max(gh1, gw1)
        matches += len(i0)
        right += int((np.linalg.norm(apply_transform(item["H"], p0) - p1, axis=1) <= cell).sum())
        M = fit_geometry(p0, p1, "affine", cell, min_inliers=MIN_MATCHES).matrix
        if M is not None:
            err = float(corner_error(M, item["H"], Size(*item["opt_size"])).mean())
            hits += err <= VIEW_HIT_PX
            hits2 += err <= 2 * VIEW_HIT_PX
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "matches": matches / max(len(items), 1),
            "precision": right / max(matches, 1), "hits": hits,
            "hits2": hits2, "of": len(items)}


def train(items: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]], steps: int = 2000, batch: int = 8,
          lr: float = 3e-4, seed: int = 0, every: int = 250, model_conf: dict[str, Any] | None = None,
          checkpoint: Path | None = None, device: str = "cpu") -> tuple[Any, list[dict[str, Any]]]:
    """AdamW on :func:`item_loss` over random training views (``batch`` per step); the state with the most
    validation hits within 2 x ``VIEW_HIT_PX`` (then within ``VIEW_HIT_PX``, then the lowest loss; ties: the later) is
    returned with the history. ``checkpoint``: saved there every ``every`` steps and resumed from when present.
    ``device``: where the head trains (the cached tokens move there one view at a time)."""
    from promptmid.models.dense_matcher import DenseMatcher

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = DenseMatcher(**(model_conf or {})).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    state: dict[str, Any] = {"step": 0, "best": None, "best_key": None, "history": []}
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng = state["rng"]
        print(f"resumed at step {state['step']}", flush=True)
    running: list[float] = []
    t0 = time.perf_counter()
    for step in range(state["step"] + 1, steps + 1):
        model.train()
        losses = [loss for i in rng.integers(0, len(items), batch) if (loss := item_loss(model, items[i])) is not None]
        if losses:
            loss = torch.stack(losses).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            running.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            model.eval()
            row = {"step": step, "loss": float(np.mean(running)) if running else float("nan"),
                   "seconds": round(time.perf_counter() - t0, 1),
                   **{f"val_{k}": v for k, v in evaluate(model, val).items()}}
            state["history"].append(row)
            print(row, flush=True)
            running = []
            key = (row["val_hits2"], row["val_hits"], -row["val_loss"])
            if state["best_key"] is None or key >= state["best_key"]:
                state["best_key"] = key
                state["best"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            state.update(step=step, model=model.state_dict(), optimizer=opt.state_dict(), rng=rng)
            if checkpoint is not None:
                torch.save(state, checkpoint)
    model = model.cpu()
    model.load_state_dict(state["best"])
    return model.eval(), state["history"]


def main(argv: Sequence[str] | None = None) -> int:
    from promptmid.evaluation.pipeline import git_revision
    from promptmid.models.dense_matcher import save_matcher
    from promptmid.training.data import data_records, select

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/optsar", help="folder with all.jsonl")
    ap.add_argument("--out", default="promptmid/weights/promptmid-dense-v1.safetensors")
    ap.add_argument("--views", type=int, default=8, help="augmented views per training pair")
    ap.add_argument("--synthetic", type=int, default=0,
                    help="views per training pair of its optical image against a pseudo-SAR made from it")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="where the head trains (e.g. cuda); the backbone runs on the CPU")
    ap.add_argument("--cache", default=None, help="folder for the token caches and the checkpoint (resumable)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = data_records(args.data)
    if records is None:
        return 2
    cache = Path(args.cache) if args.cache else None
    train_items = cached_items(cache, f"train_v{args.views}_s{args.seed}",
                               lambda: build_items(select(records, "train"), args.views, args.seed))
    if args.synthetic:
        train_items = train_items + cached_items(
            cache, f"synthetic_v{args.synthetic}_s{args.seed}",
            lambda: build_items(select(records, "train"), args.synthetic, args.seed + 1, synthetic=True))
    val_items = cached_items(cache, "val_v3_s123",
                             lambda: build_items(select(records, "val") + select(records, "near"), 3, 123))
    model, history = train(train_items, val_items, steps=args.steps, lr=args.lr, seed=args.seed,
                           checkpoint=cache / "checkpoint.pt" if cache else None, device=args.device)
    info = {"date": datetime.date.today().isoformat(), "commit": git_revision(Path(__file__).parent),
            "train_views": len(train_items),
            "views_per_pair": args.views, "synthetic_per_pair": args.synthetic, "val_views": len(val_items), "steps": args.steps, "lr": args.lr,
            "seed": args.seed, "history": history}
    print("sha256", save_matcher(model, Path(args.out), info))
    return 0


def cached_items(folder: Path | None, name: str, build: Any) -> list[dict[str, Any]]:
    """``build()`` once, kept in ``folder/name.pt`` (no folder: not kept)."""
    file = folder / f"{name}.pt" if folder is not None else None
    if file is not None and file.is_file():
        return torch.load(file, weights_only=False)
    items = build()
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(items, file)
    return items


if __name__ == "__main__":
    sys.exit(main())
