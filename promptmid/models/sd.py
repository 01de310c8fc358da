"""Stable Diffusion in diffusers layout: loading (local directory or hub id, offline-safe), LoRA
adapters, and the primitives the diffusion features, the land-use classifier and PromptDM
fine-tuning share (image preparation, VAE latents, prompt embeddings, denoising targets, UNet
up-block features).

Weights come from a local directory in diffusers layout (``unet/ vae/ text_encoder/
tokenizer/ scheduler/``) or, for users with internet, a Hugging Face hub id
(``HF_HUB_OFFLINE=1`` is honoured). PromptDM = the same UNet plus a LoRA adapter
written by :func:`promptmid.training.finetune_dm.finetune_dm` (peft format).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from promptmid.errors import InputError, ModelError

GET_WEIGHTS_HELP = (
    "Get Stable Diffusion 2.1 weights in diffusers layout on a machine with internet, e.g. "
    "`hf download stabilityai/stable-diffusion-2-1-base --local-dir sd21` "
    "(or `huggingface-cli download ...`; any SD 2.x/1.x model or mirror in diffusers layout works), "
    "copy the directory here and pass it with --dm PATH."
)
# subfolder -> (human description, alternatives: each a tuple of glob patterns that must all match)
REQUIRED_FILES: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "unet": ("UNet", (("config.json",), ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin"))),
    "vae": ("VAE", (("config.json",), ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin"))),
    "text_encoder": ("CLIP text encoder", (("config.json",), ("model*.safetensors", "pytorch_model*.bin"))),
    "tokenizer": ("CLIP tokenizer", (("vocab.json", "tokenizer.json"), ("merges.txt", "tokenizer.json"))),
    "scheduler": ("scheduler", (("scheduler_config.json",),)),
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model used for features, classification and fine-tuning."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: Any
    scheduler: Any
    source: str = ""
    lora: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


# --------------------------------------------------------------------------- loading


def load_sd_components(
    path_or_id: str | Path,
    lora: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SDComponents:
    """Load UNet, VAE, CLIP text encoder + tokenizer and scheduler of a diffusers-layout model.

    Args:
        path_or_id: a local directory (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``) or,
            when no such path exists, a hub id like ``org/name`` (cache only if ``HF_HUB_OFFLINE=1``).
            Our own small model (``"promptdm-small"``) is loaded by :func:`promptmid.models.promptdm.load_components`,
            which takes either.
        lora: optional PromptDM adapter: a peft directory (``adapter_config.json`` +
            ``adapter_model.safetensors``) or a diffusers LoRA file/directory
            (``pytorch_lora_weights.safetensors``). It is merged into the UNet weights.
        device: torch device for all modules.
        dtype: weight dtype (``torch.float16`` for GPUs).

    The scheduler is always a ``DDPMScheduler`` built from ``scheduler/scheduler_config.json``
    (only its noise schedule and ``prediction_type`` are used, identical for DDIM/PNDM configs).
    All modules are frozen and in eval mode.

    Raises:
        ModelError: missing directory/subfolder/file (saying which and how to get weights),
            unloadable weights, or a LoRA whose keys do not match the UNet.
    """
    source = str(path_or_id)
    local = Path(source).expanduser()
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if local.exists():
        check_model_dir(local)
        source = str(local)
    elif _HUB_ID.fullmatch(source) and not source.startswith((".", "~")):
        kwargs["local_files_only"] = _offline()
    else:
        raise ModelError(f"Stable Diffusion model directory not found: {source}. {GET_WEIGHTS_HELP}")
    components = _load_all(source, kwargs)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to(device).eval().requires_grad_(False)
    if lora is not None:
        components.unet = apply_lora(components.unet, lora)
        components.lora = str(lora)
    return components


def check_model_dir(root: Path) -> None:
    """Raise :class:`ModelError` listing every missing subfolder/file of a diffusers SD directory."""
    if not root.is_dir():
        raise ModelError(f"Stable Diffusion model path is not a directory: {root}. {GET_WEIGHTS_HELP}")
    missing = []
    for sub, (what, groups) in REQUIRED_FILES.items():
        folder = root / sub
        if not folder.is_dir():
            missing.append(f"{sub}/ ({what})")
            continue
        for patterns in groups:
            if not any(any(folder.glob(p)) for p in patterns):
                missing.append(f"{sub}/{' or '.join(patterns)} ({what})")
    if missing:
        raise ModelError(
            f"Stable Diffusion model directory {root} is incomplete; missing: {', '.join(missing)}. "
            f"{GET_WEIGHTS_HELP}"
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_all(source: str, kwargs: dict[str, Any]) -> SDComponents:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    hub_only = {k: v for k, v in kwargs.items() if k != "torch_dtype"}
    parts = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(source, subfolder="unet", **_variant(source, "unet"), **kwargs),
        "vae": lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", **_variant(source, "vae"), **kwargs),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=kwargs["torch_dtype"], **hub_only),
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub_only),
        "scheduler": lambda: DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub_only),
    }
    loaded = {}
    for name, load in parts.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded[name] = load()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            where = "local directory" if Path(source).exists() else "hub id (offline: HF cache only)" if _offline() else "hub id"
            raise ModelError(f"Cannot load {name} of Stable Diffusion {where} {source}: {exc}. {GET_WEIGHTS_HELP}") from exc
    return SDComponents(**loaded, source=source)


def _variant(source: str, sub: str) -> dict[str, str]:
    """Use the ``fp16`` weight variant when a local folder ships only that one."""
    folder = Path(source) / sub
    if folder.is_dir() and not any(folder.glob("diffusion_pytorch_model.safetensors")) and not any(
        folder.glob("diffusion_pytorch_model.bin")
    ):
        if any(folder.glob("diffusion_pytorch_model.fp16.*")):
            return {"variant": "fp16"}
    return {}


def apply_lora(unet: torch.nn.Module, lora: str | Path) -> torch.nn.Module:
    """Load a PromptDM LoRA adapter into ``unet`` and merge it; return the plain UNet.

    Raises:
        ModelError: adapter missing, or its target modules/keys/shapes do not match the UNet.
    """
    path = Path(lora).expanduser()
    if (path / "adapter_config.json").is_file():
        return _apply_peft_lora(unet, path)
    file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    if file.is_file() and file.suffix == ".safetensors":
        return _apply_diffusers_lora(unet, file)
    raise ModelError(
        f"LoRA adapter not found or not recognised: {path}. Expected a directory with adapter_config.json + "
        "adapter_model.safetensors (written by `promptmid finetune-dm`) or a diffusers "
        "pytorch_lora_weights.safetensors file."
    )


def _apply_peft_lora(unet: torch.nn.Module, path: Path) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    state = _read_adapter_state(path)
    try:
        config = LoraConfig.from_pretrained(str(path))
        model = get_peft_model(unet, config)
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"LoRA adapter {path} does not fit this UNet: {exc}") from exc
    expected = set(get_peft_model_state_dict(model))
    unexpected, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unexpected or missing:
        raise ModelError(
            f"LoRA adapter {path} does not match this UNet: {len(unexpected)} unexpected keys "
            f"(e.g. {unexpected[:2]}), {len(missing)} missing keys (e.g. {missing[:2]}). "
            "Was it trained for a different base model?"
        )
    try:
        set_peft_model_state_dict(model, state)
    except RuntimeError as exc:  # shape mismatch
        raise ModelError(f"LoRA adapter {path} has wrong tensor shapes for this UNet: {exc}") from exc
    return model.merge_and_unload().eval().requires_grad_(False)


def _read_adapter_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = path / "adapter_model.safetensors"
    if file.is_file():
        return load_file(str(file))
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ModelError(f"LoRA adapter {path} has adapter_config.json but no adapter_model.safetensors.")


def _apply_diffusers_lora(unet: torch.nn.Module, file: Path) -> torch.nn.Module:
    try:
        unet.load_lora_adapter(str(file), prefix="unet", adapter_name="promptdm")
        unet.fuse_lora()
        unet.unload_lora()
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelError(f"LoRA file {file} does not match this UNet: {exc}") from exc
    return unet.eval().requires_grad_(False)


# --------------------------------------------------------------------------- SD primitives


def prepare_image(image: torch.Tensor, long_side: int | None) -> torch.Tensor:
    """Resize ``[1, 3, H, W]`` so the long side is ~``long_side`` and both sides are multiples of 64.

    SD's UNet halves the latent (1/8 of the image) three times, so the image sides must be
    multiples of 64. ``long_side=None`` keeps the scale and only rounds. The resize may
    change the aspect ratio slightly; feature maps still cover the whole input image, which is
    the convention of :func:`promptmid.models.sampling.sample_features`.
    """
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise InputError(f"Expected an image tensor [1, 3, H, W], got {tuple(image.shape)}.")
    h, w = image.shape[-2:]
    scale = 1.0 if long_side is None else long_side / max(h, w)
    size = tuple(max(64, int(round(s * scale / 64)) * 64) for s in (h, w))
    if size == (h, w):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def encode_latents(components: SDComponents, image: torch.Tensor) -> torch.Tensor:
    """Diffusion latents ``[B, 4, H/8, W/8]`` of ``[B, 3, H, W]`` images in [0, 1].

    The VAE posterior mean (deterministic), shifted by ``shift_factor`` (if the VAE config has
    one; SD 1.x/2.x do not) and multiplied by ``scaling_factor``, as diffusers pipelines do.
    """
    vae = components.vae
    x = image.to(components.device, vae.dtype) * 2.0 - 1.0
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def encode_prompt(components: SDComponents, prompt: str, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """CLIP text embedding ``[1, L, D]`` (last hidden state, as SD pipelines use) of ``prompt``, cached."""
    if cache is not None and prompt in cache:
        return cache[prompt]
    tok = components.tokenizer
    ids = tok([prompt], padding="max_length", max_length=prompt_length(components), truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = components.text_encoder(ids.input_ids.to(components.device))[0].to(components.dtype)
    if cache is not None:
        cache[prompt] = emb
    return emb


def prompt_length(components: SDComponents) -> int:
    """Tokens per prompt: the tokenizer's ``model_max_length``, clamped to the text encoder's
    ``max_position_embeddings`` (a tokenizer without a set length reports ~1e30, which would overflow)."""
    limit = getattr(components.text_encoder.config, "max_position_embeddings", None) or 77
    length = getattr(components.tokenizer, "model_max_length", None) or limit
    return int(min(length, limit))


def denoising_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (ε), the velocity (v) or the clean latent."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ModelError(f"Unsupported scheduler prediction_type {kind!r}.")


def up_block_geometry(unet: torch.nn.Module, vae: torch.nn.Module) -> dict[int, tuple[int, int]]:
    """``{up-block index: (channels, stride in image pixels)}`` of the UNet's up-block outputs.

    Up-block ``i`` of ``n`` ends with an upsampler unless it is the last one, so its output lies
    at latent resolution / 2**(n-2-i); the VAE downsamples by 2**(len(vae blocks)-1).
    SD 2.1: {0: (1280, 32), 1: (1280, 16), 2: (640, 8), 3: (320, 8)}.
    """
    channels = list(reversed(unet.config.block_out_channels))
    n = len(channels)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return {i: (channels[i], vae_factor * 2 ** max(n - 2 - i, 0)) for i in range(n)}


class _StopUNet(Exception):
    """Raised by a hook once the last needed up-block has run (skips the rest of the UNet)."""


def unet_up_features(
    components: SDComponents,
    noisy: torch.Tensor,
    timestep: int,
    text: torch.Tensor,
    up_blocks: tuple[int, ...],
) -> dict[int, torch.Tensor]:
    """One UNet pass on ``noisy`` ``[B, 4, h, w]``; return up-block outputs ``{i: [B, C_i, h_i, w_i]}``.

    Forward hooks capture the outputs; the pass stops after the deepest requested block.
    """
    unet = components.unet
    base = unet.get_base_model() if hasattr(unet, "get_base_model") else unet
    captured: dict[int, torch.Tensor] = {}
    last = max(up_blocks)

    def hook(index: int):
        def fn(_module, _inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
            if index == last:
                raise _StopUNet

        return fn

    handles = [base.up_blocks[i].register_forward_hook(hook(i)) for i in up_blocks]
    steps = torch.full((noisy.shape[0],), timestep, dtype=torch.long, device=noisy.device)
    try:
        with torch.no_grad():
            unet(noisy, steps, encoder_hidden_states=text.expand(noisy.shape[0], -1, -1))
    except _StopUNet:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


# --------------------------------------------------------------------------- feature source
