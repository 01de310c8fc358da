"""Train the projection of ALIKED's dense map that the area search correlates (``search.learned = "trained"``).

The search (:mod:`promptmid.search`) stacks a few channels of ALIKED's dense map onto the oriented gradients and
correlates optical against SAR over every shift (masked NCC). By default the 128 channels are reduced with a fixed
random matrix; here the matrix is trained so that the correlation peaks at the true shift and nowhere else:

- data: training-split pairs (exact/approx GT). Each image is reduced to the search's coarse level exactly as the
  search does it (:func:`promptmid.search_levels.make_level`, ALIKED seeing the image at <= 512 px in its own frame);
  the SAR level is then warped onto the optical level by the truth (gray values, mask and ALIKED channels), and its
  oriented gradients are computed on the warped gray, as the search does on its canvases.
- loss: an optical crop against a larger SAR window around it (an unknown shift of up to ``radius`` level px) and
  that window turned by 90, 180 and 270 degrees (distractors), the masked NCC of every shift of all four, a softmax
  over all of them at temperature ``TEMPERATURE``, cross-entropy at the true shift.
- selection: validation pairs only (:func:`peak_hits`: the coarse-level peak within 1 px of the truth).

Run: ``python -m promptmid.training.search_head --data ../shared/data/optsar --out promptmid/weights/promptmid-search-head-v1.json``
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from promptmid.config import get_config
from promptmid.dense import oriented_gradient_features
from promptmid.evaluation.manifest import Pair

TEMPERATURE = 0.02  # NCC units per logit
DENSE_CHANNELS = 128  # ALIKED's dense map


def pair_levels(rec: Pair, features: Any, io_conf: dict[str, Any], size: int = 128, sigma: float = 1.0,
                orientations: int = 9) -> dict[str, np.ndarray] | None:
    """The optical level of ``rec`` and its SAR level warped onto it by the truth (:func:`levels_of`)."""
    from promptmid.io import load_image

    opt = load_image(rec.optical, "optical", **io_conf)
    sar = load_image(rec.sar, "sar", **io_conf)
    return levels_of(opt, optical_level(opt, features, size, sigma, orientations), sar, rec.H, features, size, sigma,
                     orientations)


def synthetic_levels(opt: Any, fixed: Any, features: Any, io_conf: dict[str, Any], rng: np.random.Generator,
                     size: int = 128) -> dict[str, np.ndarray] | None:
    """:func:`levels_of` a prepared optical image (and its level ``fixed``, :func:`optical_level`) against a
    pseudo-SAR made from that same image (:func:`pseudo_sar`): a cross-modal pair with an exact, identity truth."""
    from promptmid.io import load_image

    sar = load_image(pseudo_sar(opt.image.mean(-1), opt.valid, rng), "sar", **io_conf)
    # the pseudo-SAR's pixels are the optical image's working pixels
    return levels_of(opt, fixed, sar, np.linalg.inv(opt.scale_matrix()), features, size)


def pseudo_sar(gray: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A SAR-like intensity image from an optical ``gray`` image in [0, 1]: a random non-monotonic intensity remap
    ``0.5 + 0.5 cos(w I + phi)`` of the percentile-stretched image (XoFTR's cross-modal augmentation; ``w`` in [2, 6]
    rad), a random gamma, a blur and multiplicative speckle of 2-8 looks (:func:`promptmid.synth.speckle`); invalid
    pixels are 0 (nodata)."""
    from promptmid.synth import speckle

    lo, hi = np.percentile(gray[valid], (2, 98)) if valid.any() else (0.0, 1.0)
    stretched = np.clip((gray - lo) / max(hi - lo, 1e-3), 0.0, 1.0)
    remapped = 0.5 + 0.5 * np.cos(rng.uniform(2.0, 6.0) * stretched + rng.uniform(0.0, 2 * np.pi))
    intensity = (remapped + 0.05) ** rng.uniform(1.0, 2.5)
    sigma = rng.uniform(0.0, 1.5)
    if sigma > 0.3:
        intensity = cv2.GaussianBlur(intensity.astype(np.float32), (0, 0), sigma)
    out = speckle(intensity.astype(np.float32), float(rng.uniform(2.0, 8.0)), rng)
    return np.where(valid, np.maximum(out, 1e-4), 0.0).astype(np.float32)


def optical_level(opt: Any, features: Any, size: int = 128, sigma: float = 1.0, orientations: int = 9) -> Any:
    """The search's coarse level of a prepared optical image with ALIKED's dense map (``features.dense``) as its
    learned channels (:func:`promptmid.search_levels.make_level`)."""
    from promptmid.search_levels import make_level

    return make_level(opt, size, sigma, orientations, features=False, learned=_channels_last(features.dense(opt)))


def levels_of(opt: Any, fixed: Any, sar: Any, H: np.ndarray, features: Any, size: int = 128, sigma: float = 1.0,
              orientations: int = 9) -> dict[str, np.ndarray] | None:
    """The optical level ``fixed`` of the prepared image ``opt`` (:func:`optical_level`) and the SAR level warped
    onto it by ``H`` (optical original px -> SAR original px): ``{"opt_grad", "sar_grad" [orientations, h, w],
    "opt_dense", "sar_dense" [128, h, w] float16, "opt_mask", "sar_mask" [h, w] bool}``, or ``None`` when they
    overlap on under half the optical level. ``features``: a
    :class:`promptmid.models.dense_features.SearchFeatures` (its ``dense`` map)."""
    from promptmid.search_levels import make_level, per_four_channels
    from promptmid.training.data import working_gt

    base = make_level(sar, size, sigma, orientations, features=False, learned=_channels_last(features.dense(sar)))
    to_level = [np.linalg.inv(img.scale_matrix()) @ lv.to_original for img, lv in ((opt, fixed), (sar, base))]
    T = np.linalg.inv(to_level[1]) @ working_gt(H, opt, sar) @ to_level[0]  # optical level px -> SAR level px
    h, w = fixed.gray.shape
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    gray = cv2.warpPerspective(base.gray, T, (w, h), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    dense = per_four_channels(lambda part: cv2.warpPerspective(part, T, (w, h), flags=flags,
                                                               borderMode=cv2.BORDER_REPLICATE), base.learned)
    mask = cv2.warpPerspective(base.mask.astype(np.uint8), T, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                               borderValue=0).astype(bool)
    if (mask & fixed.mask).sum() < 0.5 * fixed.mask.size:
        return None
    return {"opt_grad": oriented_gradient_features(fixed.gray, orientations, sigma),
            "sar_grad": oriented_gradient_features(gray, orientations, sigma),
            "opt_dense": fixed.learned.transpose(2, 0, 1).astype(np.float16),
            "sar_dense": dense.transpose(2, 0, 1).astype(np.float16),
            "opt_mask": fixed.mask, "sar_mask": mask & fixed.mask}


def _channels_last(dense: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(dense[0].permute(1, 2, 0).float().numpy())


def build_levels(records: Sequence[Pair], io_conf: dict[str, Any], size: int = 128, synthetic: int = 0,
                 seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The levels of every record (as :func:`pair_levels`; ALIKED-n16 loaded once), then ``synthetic`` pseudo-SAR
    pairs made from each record's optical image (:func:`synthetic_levels`, seeded); pairs that do not overlap enough
    are left out."""
    from rich.progress import track

    from promptmid.io import load_image
    from promptmid.models.dense_features import SearchFeatures

    features = SearchFeatures()
    rng = np.random.default_rng(seed)
    out = []
    for rec in track(records, description="levels"):
        opt = load_image(rec.optical, "optical", **io_conf)  # loaded and run through ALIKED once per record
        fixed = optical_level(opt, features, size)
        items = [(rec.id, levels_of(opt, fixed, load_image(rec.sar, "sar", **io_conf), rec.H, features, size))]
        items += [(f"{rec.id}#synthetic{k}", synthetic_levels(opt, fixed, features, io_conf, rng, size))
                  for k in range(synthetic)]
        for name, item in items:
            if item is not None:
                item["id"] = name
                out.append(item)
    return out


class Projection(torch.nn.Module):
    """The trained reduction of ALIKED's dense map: ``channels`` outputs per modality (``shared``: one matrix for
    both), initialised with the search's fixed random projection (:class:`SearchFeatures` ``seed=0``)."""

    def __init__(self, init: torch.Tensor, shared: bool = True) -> None:
        super().__init__()
        self.optical = torch.nn.Parameter(init.clone())
        self.sar = self.optical if shared else torch.nn.Parameter(init.clone())

    def forward(self, grad: torch.Tensor, dense: torch.Tensor, modality: str) -> torch.Tensor:
        """``[B, G, h, w]`` gradients and ``[B, 128, h, w]`` dense map -> ``[B, G + channels, h, w]``."""
        w = self.optical if modality == "optical" else self.sar
        return torch.cat([grad, torch.einsum("bchw,ck->bkhw", dense, w)], 1)


def masked_ncc(fixed: torch.Tensor, fixed_mask: torch.Tensor, moving: torch.Tensor, moving_mask: torch.Tensor
               ) -> torch.Tensor:
    """NCC of a ``[C, h, w]`` crop against every position inside a ``[C, H, W]`` window (both zero-mean inside their
    masks and zero outside, as :class:`promptmid.correlation.Correlator`): ``[H - h + 1, W - w + 1]``."""
    fixed = _zero_mean(fixed, fixed_mask)
    moving = _zero_mean(moving, moving_mask)
    num = _correlate(moving, fixed)
    eb = _correlate((moving ** 2).sum(0, keepdim=True), fixed_mask[None].float())
    return num / torch.sqrt((fixed ** 2).sum() * eb.clamp_min(1e-6))


def _correlate(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """``out[d] = sum_c sum_x fixed[c, x] * moving[c, x + d]`` for every ``d`` keeping ``fixed`` inside ``moving``
    (FFT; the circular correlation of the window's size never wraps there)."""
    size = moving.shape[-2:]
    spec = (torch.fft.rfft2(moving, s=size) * torch.fft.rfft2(fixed, s=size).conj()).sum(0)
    out = torch.fft.irfft2(spec, s=size)
    return out[: size[0] - fixed.shape[-2] + 1, : size[1] - fixed.shape[-1] + 1]


def _zero_mean(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()
    mean = (f * m).sum((1, 2), keepdim=True) / m.sum().clamp_min(1.0)
    return (f - mean) * m


def sample_loss(model: Projection, item: dict[str, torch.Tensor], rng: np.random.Generator, crop: int = 64,
                radius: int = 12) -> torch.Tensor | None:
    """Cross-entropy of the true shift among every shift of the SAR window and its three right-angle turns."""
    h, w = item["opt_mask"].shape
    win = crop + 2 * radius
    if min(h, w) < win:
        return None
    for _ in range(8):  # a window mostly inside both footprints
        wy, wx = int(rng.integers(0, h - win + 1)), int(rng.integers(0, w - win + 1))
        dy, dx = (int(v) for v in rng.integers(0, 2 * radius + 1, 2))
        oy, ox = wy + dy, wx + dx
        om = item["opt_mask"][oy:oy + crop, ox:ox + crop]
        sm = item["sar_mask"][wy:wy + win, wx:wx + win]
        if om.float().mean() > 0.7 and sm.float().mean() > 0.7:
            break
    else:
        return None
    fo = model(item["opt_grad"][None, :, oy:oy + crop, ox:ox + crop],
               item["opt_dense"][None, :, oy:oy + crop, ox:ox + crop], "optical")[0]
    fs = model(item["sar_grad"][None, :, wy:wy + win, wx:wx + win],
               item["sar_dense"][None, :, wy:wy + win, wx:wx + win], "sar")[0]
    maps = [masked_ncc(fo, om, torch.rot90(fs, k, (1, 2)), torch.rot90(sm, k, (0, 1))) for k in range(4)]
    logits = torch.stack(maps).flatten() / TEMPERATURE
    target = torch.tensor(dy * (2 * radius + 1) + dx)
    return F.cross_entropy(logits[None], target[None])


def to_tensors(item: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).float() if v.dtype != bool else torch.from_numpy(v)
            for k, v in item.items() if isinstance(v, np.ndarray)}


@torch.no_grad()
def peak_hits(model: Projection | None, items: Sequence[dict[str, torch.Tensor]], crop: int = 64, crops: int = 6,
              seed: int = 0) -> int:
    """Optical crops (``crops`` per pair, ``crop`` level px, at seeded positions) whose correlation over the whole
    aligned SAR level, and over that level turned by 180 degrees (and by 90 and 270 when square), peaks within 1
    level px of the truth. ``model=None``: the oriented gradients alone."""
    rng = np.random.default_rng(seed)
    hits = 0
    for it in items:
        h, w = it["opt_mask"].shape
        fo, fs = (it["opt_grad"], it["sar_grad"]) if model is None else (
            model(it["opt_grad"][None], it["opt_dense"][None], "optical")[0],
            model(it["sar_grad"][None], it["sar_dense"][None], "sar")[0])
        turns = (0, 1, 2, 3) if h == w else (0, 2)
        sar = [(torch.rot90(fs, k, (1, 2)), torch.rot90(it["sar_mask"], k, (0, 1))) for k in turns]
        for _ in range(crops):
            oy, ox = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            fc, mc = fo[:, oy:oy + crop, ox:ox + crop], it["opt_mask"][oy:oy + crop, ox:ox + crop]
            if mc.float().mean() < 0.7:
                continue
            maps = [masked_ncc(fc, mc, f, m) for f, m in sar]
            if maps[0].max() < max(m.max() for m in maps[1:]):
                continue
            iy, ix = divmod(int(maps[0].argmax()), maps[0].shape[1])
            hits += abs(iy - oy) <= 1 and abs(ix - ox) <= 1
    return hits


def random_init() -> torch.Tensor:
    """The search's fixed random projection (:func:`promptmid.models.dense_features.random_projection`)."""
    from promptmid.models.dense_features import random_projection

    return random_projection()


def train(items: Sequence[dict[str, torch.Tensor]], val: Sequence[dict[str, torch.Tensor]], steps: int = 600,
          batch: int = 16, lr: float = 3e-3, shared: bool = True, seed: int = 0, every: int = 100
          ) -> tuple[Projection, list[dict[str, Any]]]:
    """Adam on :func:`sample_loss` over random training crops; the state with the most validation
    :func:`peak_hits` (ties: the later) is returned with the history."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Projection(random_init(), shared)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, history, running = (-1, None), [], []
    for step in range(1, steps + 1):
        losses = [loss for i in rng.integers(0, len(items), batch) if (loss := sample_loss(model, items[i], rng))
                  is not None]
        if not losses:
            continue
        loss = torch.stack(losses).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        if step % every == 0 or step == steps:
            hits = peak_hits(model, val)
            history.append({"step": step, "loss": float(np.mean(running)), "val_hits": hits})
            print(history[-1], flush=True)
            running = []
            if hits >= best[0]:
                best = (hits, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    return model, history


def write_head(model: Projection, out: Path, info: dict[str, Any]) -> str:
    """Write the trained (shared) projection as JSON; returns its sha256 (pin it in
    :data:`promptmid.models.weights.SEARCH_HEAD_SHA256` when shipping)."""
    import hashlib

    data = {"format": "promptmid-search-head", "version": 1,
            "projection": [[round(float(v), 7) for v in row] for row in model.optical.detach().numpy()],
            "info": info}
    raw = (json.dumps(data, indent=1) + "\n").encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    from promptmid.evaluation.pipeline import git_revision
    from promptmid.training.data import data_records, select

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="../shared/data/optsar", help="folder with all.jsonl")
    ap.add_argument("--out", default="promptmid/weights/promptmid-search-head-v1.json")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--synthetic", type=int, default=0,
                    help="pseudo-SAR pairs made from each training optical image (pseudo_sar), added to the real ones")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = data_records(args.data)
    if records is None:
        return 2
    io_conf = get_config("lite")["io"]
    train_items = [to_tensors(x) for x in build_levels(select(records, "train"), io_conf, synthetic=args.synthetic,
                                                       seed=args.seed)]
    val_items = [to_tensors(x) for x in build_levels(select(records, "val") + select(records, "near"), io_conf)]
    model, history = train(train_items, val_items, steps=args.steps, lr=args.lr, seed=args.seed)
    info = {"date": datetime.date.today().isoformat(), "commit": git_revision(Path(__file__).parent),
            "train_pairs": len(train_items),
            "val_pairs": len(val_items), "synthetic_per_pair": args.synthetic,
            "steps": args.steps, "lr": args.lr, "seed": args.seed,
            "temperature": TEMPERATURE, "history": history,
            "val_hits": {"gradients": peak_hits(None, val_items),
                         "random_projection": peak_hits(Projection(random_init()), val_items),
                         "trained": peak_hits(model, val_items), "of": 6 * len(val_items)}}
    print(json.dumps(info["val_hits"]))
    print("sha256", write_head(model, Path(args.out), info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
