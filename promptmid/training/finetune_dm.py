"""PromptDM: LoRA fine-tuning of the Stable Diffusion UNet on optical and SAR images with land-use prompts.

README 'Diffusion features': LoRA (peft) on the UNet attention projections (``to_q``, ``to_k``, ``to_v``,
``to_out.0`` of self- and cross-attention), the usual diffusion loss (MSE between the UNet
output and the ε target — or v for v-prediction models) on random crops, VAE and text
encoder frozen. Output layout of ``out_dir``::

    adapter/                 final LoRA (adapter_config.json + adapter_model.safetensors);
                             load with load_components(model, lora=out_dir / "adapter")
    checkpoints/step_XXXXXX/ adapter/ + state.pt (optimizer, step, losses, RNG states)
    train_log.json           losses, classes used, settings
    loss.csv                 step, loss, seconds since start (one line per step, written as it trains)

``rank=0`` trains every UNet weight instead of a LoRA (how PromptDM-small is trained from scratch,
:mod:`promptmid.training.promptdm_small`): then ``unet.safetensors`` replaces ``adapter/`` (and the
checkpoints hold ``unet.safetensors``); for PromptDM-small it is written by
:func:`promptmid.models.promptdm.save_promptdm` and loads with ``--dm out_dir/unet.safetensors``.

Training data: a list of ``(image, class, modality)``; ``image`` is a path or an array
(``[H, W]`` / ``[H, W, C]``, any dtype: read and scaled by :func:`promptmid.io.load_image`),
``class`` a land-use class or ``None`` (chosen by the zero-shot diffusion classifier),
``modality`` "optical" or "sar". :func:`read_image_list` reads a CSV with columns
``image,class,modality`` (paths relative to the CSV).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from promptmid.errors import InputError
from promptmid.models.sd import (
    SDComponents,
    denoising_target,
    encode_latents,
    encode_prompt,
    prepare_image,
)
from promptmid.models.land_use import select_land_use
from promptmid.models.prompts import DEFAULT_PROMPTS, PromptSet
from promptmid.models.promptdm import PixelSpace, load_components, save_promptdm
from promptmid.training.checkpoint import load_state

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ImageItem = tuple[Any, "str | None", str]


@dataclass
class TrainSettings:
    """Hyper-parameters recorded in ``train_log.json`` and checkpoints."""

    rank: int = 8
    steps: int = 1000
    lr: float = 1e-4
    batch: int = 4
    crop: int = 512
    seed: int = 0
    long_side: int | None = None
    max_minutes: float = 0.0


def read_image_list(csv_path: str | Path) -> list[ImageItem]:
    """Read ``image,class,modality`` rows (header required; empty class = choose automatically).

    Raises:
        InputError: missing file/columns, unknown modality, or a listed image that does not exist.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"Image list not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"image", "modality"} <= set(reader.fieldnames):
            raise InputError(f"{path}: expected a header with columns image,class,modality; got {reader.fieldnames}")
        rows = list(reader)
    items = []
    for n, row in enumerate(rows, start=2):
        image = (path.parent / row["image"].strip()).resolve()
        modality = row["modality"].strip().lower()
        if modality not in ("optical", "sar"):
            raise InputError(f"{path}:{n}: modality must be 'optical' or 'sar', got {row['modality']!r}")
        if not image.is_file():
            raise InputError(f"{path}:{n}: image not found: {image}")
        items.append((str(image), (row.get("class") or "").strip() or None, modality))
    if not items:
        raise InputError(f"{path} lists no images.")
    return items


def load_training_image(source: Any, modality: str) -> torch.Tensor:
    """``[1, 3, H, W]`` float tensor in [0, 1] from a path or array (SAR log-scaled by promptmid.io)."""
    from promptmid.io import load_image

    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if isinstance(source, np.ndarray) and source.dtype.kind == "f" and source.min() >= 0 and source.max() <= 1:
        arr = source if source.ndim == 3 else np.repeat(source[..., None], 3, axis=-1)
        arr = arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr[..., :1], 3, axis=-1)
    else:
        arr = load_image(source, modality, max_side=None, detect_fill=False).image
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(2, 0, 1)[None]


def random_crop(image: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A random ``size x size`` crop (images smaller than ``size`` are first resized up), random h-flip."""
    h, w = image.shape[-2:]
    if min(h, w) < size:
        image = prepare_image(image, int(round(max(h, w) * size / min(h, w))))
        h, w = image.shape[-2:]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = image[..., y : y + size, x : x + size]
    return crop.flip(-1) if rng.random() < 0.5 else crop


def assign_classes(
    components: SDComponents, items: Sequence[ImageItem], prompt_set: PromptSet, seed: int
) -> list[str]:
    """Class per item: the given one (validated) or the base model's zero-shot choice."""
    classes = []
    for source, cls, modality in items:
        if cls is None:
            image = prepare_image(load_training_image(source, modality), 512)
            cls, _ = select_land_use(components, image, modality=modality, prompt_set=prompt_set, seed=seed)
        classes.append(prompt_set.check_class(cls))
    return classes


def finetune_dm(
    model_dir: str | Path,
    images: Sequence[ImageItem],
    out_dir: str | Path,
    rank: int = 8,
    steps: int = 1000,
    lr: float = 1e-4,
    batch: int = 4,
    crop: int = 512,
    seed: int = 0,
    resume: bool = True,
    checkpoint_every: int = 200,
    progress: bool = True,
    device: str = "cpu",
    prompt_set: PromptSet = DEFAULT_PROMPTS,
    eval_batch: int = 8,
    components: SDComponents | None = None,
    long_side: int | None = None,
    max_minutes: float = 0.0,
) -> dict[str, Any]:
    """Fine-tune PromptDM (LoRA on the UNet attention projections) and save the adapter.

    Args:
        model_dir: base SD model (directory or hub id, see :func:`promptmid.models.promptdm.load_components`).
        images: ``(path or array, class or None, modality)`` items (see module docstring).
        out_dir: output directory (adapter/, checkpoints/, train_log.json).
        rank: LoRA rank (alpha = rank, so the LoRA scale is 1); 0 = train every UNet weight.
        steps: total optimiser steps (including those of a resumed run).
        lr: AdamW learning rate.
        batch: crops per step.
        crop: crop side in pixels (multiple of 64; 512 for SD 2.1-base).
        seed: seeds crops, noise, timesteps and LoRA init.
        resume: continue from the latest checkpoint in ``out_dir/checkpoints`` if any.
        checkpoint_every: steps between checkpoints (0 = only the final adapter).
        progress: show a rich progress bar.
        device: torch device.
        prompt_set: land-use classes/templates.
        eval_batch: size of a fixed evaluation batch (fixed crops, noise and timesteps) whose loss
            is reported before and after training — a low-variance measure of progress.
        components: already loaded components to train (e.g. a freshly initialised PromptDM-small);
            ``model_dir`` is then only recorded.
        long_side: resize every training image so its long side is ~this (px) before cropping
            (``None`` = native size); the scale the features are later computed at.
        max_minutes: stop (checkpoint and save) once this much wall time has passed (0 = no limit).

    Returns:
        ``{"losses": [per-step loss], "eval_loss_initial", "eval_loss_final", "adapter": path,
        "classes": [class per item], "start_step", "steps"}``.
    """
    _check_inputs(images, crop)
    settings = TrainSettings(rank, steps, lr, batch, crop, seed, long_side, max_minutes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    components = components or load_components(model_dir, device=device)
    classes = assign_classes(components, images, prompt_set, seed)
    data = _TrainData(components, images, classes, prompt_set, crop, long_side)
    model = _add_lora(components, rank) if rank > 0 else components.unet.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    state = _restore(model, optimizer, out, rng) if resume else None
    start, losses = (state["step"], state["losses"]) if state else (0, [])
    eval_set = data.fixed_batch(eval_batch, seed + 1)
    eval_initial = _eval_loss(model, components, eval_set)
    step_fn = lambda: _train_step(model, components, optimizer, data.sample(batch, rng))  # noqa: E731
    log = _LossLog(out / "loss.csv", fresh=state is None, max_minutes=max_minutes)
    ours = isinstance(components.vae, PixelSpace)  # PromptDM-small: saved in its own format
    save = lambda s, l: _save_checkpoint(model, optimizer, out, s, l, rng, ours)  # noqa: E731
    losses += _run(step_fn, start, steps, progress, save, checkpoint_every, losses, log)
    adapter = _save_model(model, out, ours)
    eval_final = _eval_loss(model, components, eval_set)
    result = {"losses": losses, "eval_loss_initial": eval_initial, "eval_loss_final": eval_final,
              "adapter": str(adapter), "classes": classes, "start_step": start,
              "steps": start + len(losses) - (len(state["losses"]) if state else 0), "stopped_early": log.stopped,
              "settings": asdict(settings), "model": str(model_dir)}
    (out / "train_log.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _check_inputs(images: Sequence[ImageItem], crop: int) -> None:
    """Raises InputError: no training image, or a crop side that is not a multiple of 64 px."""
    if crop % 64:
        raise InputError(f"crop must be a multiple of 64 pixels, got {crop}.")
    if not images:
        raise InputError("finetune_dm needs at least one training image.")


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, out: Path,
             rng: np.random.Generator) -> dict[str, Any] | None:
    """The latest checkpoint's state (:func:`_resume`) with the random generators set back to it; ``None`` when
    there is no checkpoint."""
    state = _resume(model, optimizer, out)
    if state:
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
    return state


class _TrainData:
    """Images (kept in memory as [1,3,H,W] tensors) with their prompt embeddings."""

    def __init__(
        self, components: SDComponents, items: Sequence[ImageItem], classes: list[str], prompts: PromptSet, crop: int,
        long_side: int | None = None,
    ) -> None:
        self.components, self.crop = components, crop
        self.images = [load_training_image(src, mod) for src, _, mod in items]
        if long_side:
            self.images = [prepare_image(im, long_side) for im in self.images]
        cache: dict[str, torch.Tensor] = {}
        self.text = [encode_prompt(components, prompts.prompt_for(c, mod), cache) for c, (_, _, mod) in zip(classes, items)]

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A random batch: latents of random crops, noise, timesteps, text embeddings."""
        idx = rng.integers(0, len(self.images), size=n)
        crops = torch.cat([random_crop(self.images[i], self.crop, rng) for i in idx])
        latents = encode_latents(self.components, crops)
        gen = torch.Generator("cpu").manual_seed(int(rng.integers(2**31)))
        n_train = self.components.scheduler.config.num_train_timesteps
        return {
            "latents": latents,
            "noise": torch.randn(latents.shape, generator=gen).to(latents),
            "timesteps": torch.randint(0, n_train, (n,), generator=gen).to(latents.device),
            "text": torch.cat([self.text[i] for i in idx]),
        }

    def fixed_batch(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        """A reproducible batch for evaluation (independent of the training RNG)."""
        return self.sample(n, np.random.default_rng(seed))


def _add_lora(components: SDComponents, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), lora_dropout=0.0, init_lora_weights=True)
    model = get_peft_model(components.unet, config)
    components.unet = model
    return model


def _loss(model: torch.nn.Module, components: SDComponents, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    sched = components.scheduler
    noisy = sched.add_noise(batch["latents"], batch["noise"], batch["timesteps"]).to(batch["latents"])
    target = denoising_target(sched, batch["latents"], batch["noise"], batch["timesteps"])
    pred = model(noisy, batch["timesteps"], encoder_hidden_states=batch["text"]).sample
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def _train_step(model: torch.nn.Module, components: SDComponents, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    model.train()
    loss = _loss(model, components, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def _eval_loss(model: torch.nn.Module, components: SDComponents, batch: dict) -> float:
    model.eval()
    return float(_loss(model, components, batch))


def _run(
    step_fn: Callable[[], float],
    start: int,
    steps: int,
    progress: bool,
    checkpoint: Callable[[int, list[float]], None],
    every: int,
    previous: list[float],
    log: "_LossLog | None" = None,
) -> list[float]:
    """Run steps ``start+1 .. steps`` with a rich progress bar; checkpoint every ``every`` steps and at the end
    (or when ``log`` says the time budget is spent)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    losses: list[float] = []
    columns = (TextColumn("PromptDM"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=steps, completed=start, loss="-")
        for step in range(start + 1, steps + 1):
            losses.append(step_fn())
            bar.update(task, advance=1, loss=f"{np.mean(losses[-20:]):.4f}")
            stop = log is not None and log.add(step, losses[-1])
            if every and (step % every == 0 or step == steps or stop):
                checkpoint(step, previous + losses)
            if stop:
                break
    return losses


class _LossLog:
    """Appends ``step,loss,seconds`` lines to a CSV as training runs; says when ``max_minutes`` is spent."""

    def __init__(self, path: Path, fresh: bool, max_minutes: float = 0.0) -> None:
        self.path, self.limit, self.start, self.stopped = path, max_minutes * 60.0, time.monotonic(), False
        if fresh or not path.is_file():
            path.write_text("step,loss,seconds\n", encoding="utf-8")

    def add(self, step: int, loss: float) -> bool:
        """Record one step; return True when the time budget is spent."""
        elapsed = time.monotonic() - self.start
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(f"{step},{loss:.6f},{elapsed:.1f}\n")
        self.stopped = bool(self.limit) and elapsed >= self.limit
        return self.stopped


def _save_model(model: torch.nn.Module, folder: Path, promptdm: bool) -> Path:
    """Write the trained part: ``folder/adapter`` (LoRA) or ``folder/unet.safetensors`` (every weight; in
    PromptDM-small's format when ``promptdm``)."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(folder / "adapter"))
        return folder / "adapter"
    file = folder / "unet.safetensors"
    if promptdm:
        return save_promptdm(model, file, half=False)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(file))
    return file


def _save_checkpoint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, out: Path, step: int, losses: list[float],
    rng: np.random.Generator, promptdm: bool = False,
) -> None:
    folder = out / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    _save_model(model, folder, promptdm)
    state = {
        "step": step,
        "losses": losses,
        "optimizer": optimizer.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, folder / "state.pt")


def _resume(model: torch.nn.Module, optimizer: torch.optim.Optimizer, out: Path) -> dict | None:
    """Load the latest complete checkpoint into ``model``/``optimizer``; return its state or None."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folders = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / "state.pt").is_file())
    if not folders:
        return None
    latest = folders[-1]
    if hasattr(model, "peft_config"):
        set_peft_model_state_dict(model, load_file(str(latest / "adapter" / "adapter_model.safetensors")))
    else:
        model.load_state_dict({k: v.float() for k, v in load_file(str(latest / "unet.safetensors")).items()})
    state = load_state(latest / "state.pt", ("optimizer",))  # no pickle code runs; a foreign file is refused
    optimizer.load_state_dict(state["optimizer"])
    return state
