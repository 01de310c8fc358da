"""`promptmid finetune-dm`: PromptDM, LoRA fine-tuning of PromptDM-small or Stable Diffusion on optical/SAR images
with prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from promptmid.commands.common import OverwriteOpt, QuietOpt, add_command, out_console, set_threads


def finetune_dm(
    dm: str = typer.Option(..., "--dm", help="Base model: promptdm-small (the shipped PromptDM-small, "
                     "pixel space: use a small --crop such as 64), or Stable Diffusion (diffusers layout dir, or hub id)."),
    images: Path = typer.Option(..., "--images", help="CSV with columns image,class,modality (empty class = "
                                "chosen by the diffusion classifier; modality optical|sar)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (adapter/, checkpoints/, train_log.json)."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank on the UNet attention projections."),
    steps: int = typer.Option(1000, "--steps", help="Total optimiser steps (a resumed run continues to this)."),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate."),
    batch: int = typer.Option(4, "--batch", help="Random crops per step."),
    crop: int = typer.Option(512, "--crop", help="Crop side (px, multiple of 64)."),
    seed: int = typer.Option(0, "--seed", help="Seed of crops, noise, timesteps and LoRA init."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints (0 = none)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="Land-use classes/templates file."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cuda."),
    no_resume: bool = typer.Option(False, "--no-resume", help="Start over instead of resuming from checkpoints."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: all)."),
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Fine-tune PromptDM (the shipped PromptDM-small or Stable Diffusion): LoRA on the UNet, epsilon-prediction
    loss, text encoder (and SD's VAE) frozen."""
    from promptmid.errors import OutputExistsError
    from promptmid.models.prompts import DEFAULT_PROMPTS, load_prompt_set
    from promptmid.training.finetune_dm import finetune_dm as run, read_image_list

    set_threads(threads)
    items = read_image_list(images)
    if out.exists() and any(out.iterdir()) and no_resume and not overwrite:
        raise OutputExistsError(f"{out} is not empty; pass --overwrite with --no-resume to start over there.")
    prompts = load_prompt_set(prompt_file) if prompt_file else DEFAULT_PROMPTS
    log = run(dm, items, out, rank=rank, steps=steps, lr=lr, batch=batch, crop=crop, seed=seed,
              resume=not no_resume, checkpoint_every=checkpoint_every, progress=not quiet, device=device,
              prompt_set=prompts)
    if not quiet:
        out_console.print(f"loss on the fixed evaluation batch: {log['eval_loss_initial']:.4f} -> "
                          f"{log['eval_loss_final']:.4f}; adapter: {log['adapter']} (use --dm-lora)")


def register(app: typer.Typer) -> None:
    """Add ``finetune-dm`` to ``app``."""
    add_command(app, "finetune-dm", finetune_dm)
