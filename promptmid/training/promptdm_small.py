"""Train PromptDM-small from scratch on the training split of the shared optical–SAR pairs.

Data (:func:`training_items`): both images of every pair whose :func:`promptmid.evaluation.split.split_group` is
``"train"`` (srif pairs 1-180 except 169, 3MOS GF3_* and RCM_* tiles) — never validation or unseen pairs.
Prompts: "an optical satellite image of {scene}" / "a SAR satellite image of {scene}" for the 3MOS tiles
(manifest field ``scene``), the generic "an optical satellite image" / "a SAR satellite image" for srif
(no land-use label). The loop is :func:`promptmid.training.finetune_dm.finetune_dm` with ``rank=0``
(every UNet weight trained), images at :data:`promptmid.models.promptdm.LONG_SIDE` px, random crops.

Run (1 thread, resumable; ``promptmid finetune-dm --dm promptdm-small`` later adds a LoRA on a user's images)::

    python -m promptmid.training.promptdm_small ../shared/data/optsar --out runs/promptdm --minutes 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from promptmid.evaluation.manifest import read_manifest
from promptmid.evaluation.split import split_group
from promptmid.models.promptdm import (
    LONG_SIDE,
    NAME,
    PROMPTS,
    PixelSpace,
    build_scheduler,
    build_unet,
    load_text_encoder,
    save_promptdm,
)
from promptmid.models.prompts import GENERIC
from promptmid.models.sd import SDComponents
from promptmid.training.finetune_dm import ImageItem, finetune_dm

MANIFESTS = ("srif.jsonl", "3mos.jsonl")


def training_items(data_root: str | Path) -> list[ImageItem]:
    """``(path, class, modality)`` for both images of every training-split pair under ``data_root``
    (``manifests/srif.jsonl``, ``manifests/3mos.jsonl``); class = the 3MOS ``scene`` or :data:`GENERIC`."""
    items: list[ImageItem] = []
    for name in MANIFESTS:
        for pair in read_manifest(Path(data_root) / "manifests" / name):
            if split_group(pair) != "train":
                continue
            cls = str(pair.meta.get("scene") or GENERIC)
            items += [(str(pair.optical), PROMPTS.check_class(cls), "optical"), (str(pair.sar), cls, "sar")]
    return items


def fresh_components(seed: int = 0) -> SDComponents:
    """A randomly initialised PromptDM-small UNet with the frozen MiniLM text encoder and DDPM schedule."""
    torch.manual_seed(seed)
    tokenizer, encoder = load_text_encoder()
    return SDComponents(unet=build_unet(), vae=PixelSpace(), text_encoder=encoder, tokenizer=tokenizer,
                        scheduler=build_scheduler(), source=NAME)


def train_promptdm_small(
    data_root: str | Path, out: str | Path, steps: int = 4000, batch: int = 12, crop: int = 64,
    lr: float = 3e-4, minutes: float = 50.0, seed: int = 0, checkpoint_every: int = 250, progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) PromptDM-small; write ``out/unet.safetensors`` (float32) and ``out/promptdm-small.safetensors``
    (float16, the shippable file) and return the training log (see :func:`finetune_dm`)."""
    items = training_items(data_root)
    log = finetune_dm(NAME, items, out, rank=0, steps=steps, lr=lr, batch=batch, crop=crop, seed=seed,
                      checkpoint_every=checkpoint_every, progress=progress, prompt_set=PROMPTS,
                      components=fresh_components(seed), long_side=LONG_SIDE, max_minutes=minutes)
    from safetensors.torch import load_file

    unet = build_unet()
    unet.load_state_dict(load_file(str(Path(out) / "unet.safetensors")))
    counts = {"images": str(len(items)), "steps": str(log["steps"]), "batch": str(batch), "crop": str(crop)}
    save_promptdm(unet, Path(out) / "promptdm-small.safetensors", half=True, **counts)
    return log


def main(argv: list[str] | None = None) -> None:
    """Command-line entry (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", help="folder with manifests/srif.jsonl and manifests/3mos.jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--minutes", type=float, default=50.0, help="wall-time budget of this run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = train_promptdm_small(args.data_root, args.out, args.steps, args.batch, args.crop, args.lr, args.minutes,
                               args.seed, progress=False)
    print(json.dumps({k: v for k, v in log.items() if k not in ("losses", "classes")}, indent=2))


if __name__ == "__main__":
    main()
