"""Prompt-conditioned Stable Diffusion features (the diffusion branch of PromptMID).

DIFT-style one-step features (README, 'Pipeline and presets'): the image is VAE-encoded, noised at one
timestep ``t``, passed once through the UNet with a land-use prompt embedding, and the
outputs of chosen UNet up-blocks are kept (SD 2.1: up-block 1 = 1280 ch at 1/16 of the
image, up-block 2 = 640 ch at 1/8), averaged over an ensemble of noise draws, and sampled
at keypoints with :func:`promptmid.models.sampling.sample_features`.

Weights come from a local directory in diffusers layout (``unet/ vae/ text_encoder/
tokenizer/ scheduler/``) or, for users with internet, a Hugging Face hub id
(``HF_HUB_OFFLINE=1`` is honoured). PromptDM = the same UNet plus a LoRA adapter
written by :func:`promptmid.training.finetune_dm.finetune_dm` (peft format).

Coordinates follow :mod:`promptmid.models.sampling`: keypoints are ``(x, y)`` pixels of the
image passed to :meth:`DiffusionFeatures.describe`, pixel centres at integers.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from promptmid.errors import InputError, ModelError
from promptmid.models.prompts import (
    DEFAULT_PROMPTS,
    SELECTION_TIMESTEPS,
    Modality,
    PromptSet,
    load_prompt_set,
    select_land_use,
)
from promptmid.models.sampling import sample_features

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
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = components.text_encoder(ids.input_ids.to(components.device))[0].to(components.dtype)
    if cache is not None:
        cache[prompt] = emb
    return emb


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


class DiffusionFeatures:
    """Feature source: prompt-conditioned SD up-block features at keypoints (DIFT-style).

    Usage::

        sd = DiffusionFeatures("path/to/sd21", lora="promptdm/adapter", land_use="auto")
        cls, scores = sd.choose_land_use(optical)        # once per pair (optional)
        f_opt = sd.describe(optical, kps_opt, modality="optical")
        f_sar = sd.describe(sar, kps_sar, modality="sar")  # {"sd_up1": [N,1280], "sd_up2": [N,640]}

    Land use (``land_use``): ``"auto"`` picks the class with the diffusion classifier
    (:func:`promptmid.models.prompts.select_land_use`) on the image being described unless
    :meth:`choose_land_use` / :meth:`set_land_use` fixed it for the pair (recommended:
    choose on the optical image, then describe both); ``"average"`` uses the mean prompt
    embedding over all classes; any class name fixes that class. ``conf["prompt"]`` (a
    literal text) overrides all of this. The modality selects the template
    ("an optical satellite image of {class}" / "a SAR satellite image of {class}") and is
    given per call (``describe(..., modality=...)``) or by :meth:`set_modality`.
    """

    name = "diffusion"
    default_conf: dict[str, Any] = {
        "timestep": 40,  # diffusion timestep t of the single noising step (0..999); DIFT/DESIGN: small t
        "up_blocks": (1, 2),  # UNet up-blocks whose outputs are kept (SD 2.1: 1 -> 1280ch @1/16, 2 -> 640ch @1/8)
        "ensemble": 4,  # noise draws averaged per image (8 for quality runs)
        "ensemble_batch": 0,  # draws per UNet batch; 0 = all at once (lower it to cap memory)
        "long_side": 512,  # input resized so the long side is ~this (px), sides rounded to multiples of 64; None = keep
        "prompt": None,  # literal prompt text overriding land-use prompts (same for both modalities)
        "prompt_file": None,  # JSON/YAML/text file replacing land-use classes/templates (prompts.load_prompt_set)
        "modality": "optical",  # default modality when describe() gets none: "optical" | "sar"
        "seed": 0,  # noise of ensemble member k is drawn with seed + k (reproducible, shared by both images)
        "selection_timesteps": SELECTION_TIMESTEPS,  # timesteps scored by the land-use classifier
        "selection_noise": 2,  # noise draws per timestep for the land-use classifier
        "fp16": False,  # half-precision weights (CUDA only; ignored on CPU)
        "attention_slicing": False,  # compute attention in slices (less GPU memory, slower)
    }

    def __init__(
        self,
        model: str,
        lora: str | None = None,
        land_use: str = "auto",
        device: str = "cpu",
        **conf: Any,
    ) -> None:
        unknown = set(conf) - set(self.default_conf)
        if unknown:
            raise ValueError(f"Unknown DiffusionFeatures option(s) {sorted(unknown)}; valid: {sorted(self.default_conf)}")
        self.conf = {**self.default_conf, **conf}
        self.conf["up_blocks"] = tuple(int(i) for i in self.conf["up_blocks"])
        self.model, self.lora, self.land_use = str(model), lora, land_use
        self.prompts: PromptSet = load_prompt_set(self.conf["prompt_file"]) if self.conf["prompt_file"] else DEFAULT_PROMPTS
        if land_use not in ("auto", "average"):
            self.prompts.check_class(land_use)
        self.components = load_sd_components(model, lora=lora, device=device, dtype=self._dtype(device))
        self.geometry = up_block_geometry(self.components.unet, self.components.vae)
        bad = [i for i in self.conf["up_blocks"] if i not in self.geometry]
        if bad:
            raise ValueError(f"up_blocks {bad} do not exist; this UNet has up-blocks {sorted(self.geometry)}.")
        if self.conf["attention_slicing"]:
            self.components.unet.set_attention_slice("auto")
        self._text_cache: dict[str, torch.Tensor] = {}
        self._pair_class: str | None = None
        self.last_prompt = ""
        self.last_selection: tuple[str, dict[str, float]] | None = None

    def _dtype(self, device: str) -> torch.dtype:
        if self.conf["fp16"] and not str(device).startswith("cuda"):
            warnings.warn("fp16 is only used on CUDA devices; running in float32.", stacklevel=3)
            return torch.float32
        return torch.float16 if self.conf["fp16"] else torch.float32

    # ----------------------------------------------------------------- configuration

    def set_modality(self, modality: Modality) -> None:
        """Default modality for later :meth:`describe` / :meth:`dense` calls."""
        self.prompts.prompt_for(self.prompts.classes[0], modality)  # validates
        self.conf["modality"] = modality

    def begin_pair(self, optical: torch.Tensor) -> None:
        """Start a new optical/SAR pair: with ``land_use="auto"``, choose the class on the optical image
        ``[1, 3, H, W]`` so that both images are described with the same land-use prompt."""
        self.set_land_use(None)
        if self.land_use == "auto" and not self.conf["prompt"]:
            self.choose_land_use(optical, "optical")

    def set_land_use(self, cls: str | None) -> None:
        """Fix the land-use class for the following calls (``None`` = back to ``land_use`` mode)."""
        self._pair_class = None if cls is None else self.prompts.check_class(cls)

    def choose_land_use(self, image: torch.Tensor, modality: Modality = "optical") -> tuple[str, dict[str, float]]:
        """Classify ``image`` ``[1,3,H,W]`` with the diffusion classifier and fix the class for the pair."""
        cls, scores = select_land_use(
            self.components,
            prepare_image(image, self.conf["long_side"]),
            modality=modality,
            prompt_set=self.prompts,
            timesteps=tuple(self.conf["selection_timesteps"]),
            n_noise=self.conf["selection_noise"],
            seed=self.conf["seed"],
            embed=self._text_cache,
        )
        self._pair_class, self.last_selection = cls, (cls, scores)
        return cls, scores

    def strides(self) -> dict[str, int]:
        """Feature-map stride (image pixels per cell, after :func:`prepare_image`) of each output."""
        return {f"sd_up{i}": self.geometry[i][1] for i in self.conf["up_blocks"]}

    def channels(self) -> dict[str, int]:
        """Channel count of each output."""
        return {f"sd_up{i}": self.geometry[i][0] for i in self.conf["up_blocks"]}

    # ----------------------------------------------------------------- features

    def conditioning(self, image: torch.Tensor | None, modality: Modality) -> torch.Tensor:
        """Prompt embedding ``[1, L, D]`` for ``image`` (prepared) in ``modality``; sets ``last_prompt``."""
        if self.conf["prompt"]:
            self.last_prompt = str(self.conf["prompt"])
            return encode_prompt(self.components, self.last_prompt, self._text_cache)
        if self.land_use == "average" and self._pair_class is None:
            texts = [self.prompts.prompt_for(c, modality) for c in self.prompts.classes]
            self.last_prompt = f"average of {len(texts)} prompts: {texts[0]} ..."
            return torch.stack([encode_prompt(self.components, t, self._text_cache) for t in texts]).mean(0)
        cls = self._class_for(image, modality)
        self.last_prompt = self.prompts.prompt_for(cls, modality)
        return encode_prompt(self.components, self.last_prompt, self._text_cache)

    def _class_for(self, image: torch.Tensor | None, modality: Modality) -> str:
        if self._pair_class is not None:
            return self._pair_class
        if self.land_use != "auto":
            return self.land_use
        if image is None:
            raise InputError("land_use='auto' needs an image (or call choose_land_use / set_land_use first).")
        cls, scores = select_land_use(
            self.components, image, modality=modality, prompt_set=self.prompts,
            timesteps=tuple(self.conf["selection_timesteps"]), n_noise=self.conf["selection_noise"],
            seed=self.conf["seed"], embed=self._text_cache,
        )  # fmt: skip
        self.last_selection = (cls, scores)
        return cls

    def dense(
        self, image: torch.Tensor, prompt: str | None = None, modality: Modality | None = None
    ) -> dict[str, torch.Tensor]:
        """Dense features ``{"sd_up{i}": [1, C_i, h_i, w_i]}`` (float32, CPU) of ``[1,3,H,W]`` in [0,1].

        The maps cover the whole input image; cell size = ``strides()`` pixels of the image
        resized by :func:`prepare_image`. ``prompt`` (text) overrides the land-use prompt.
        """
        modality = modality or self.conf["modality"]
        x = prepare_image(image, self.conf["long_side"])
        if prompt is not None:
            self.last_prompt = prompt
            text = encode_prompt(self.components, prompt, self._text_cache)
        else:
            text = self.conditioning(x, modality)
        latents = encode_latents(self.components, x)
        sums = self._ensemble_sum(latents, text)
        n = self.conf["ensemble"]
        return {f"sd_up{i}": (s / n).float().cpu() for i, s in sums.items()}

    def _ensemble_sum(self, latents: torch.Tensor, text: torch.Tensor) -> dict[int, torch.Tensor]:
        """Sum of up-block outputs over the ensemble; member k uses noise seeded with seed + k."""
        n, seed, t = self.conf["ensemble"], self.conf["seed"], int(self.conf["timestep"])
        chunk = self.conf["ensemble_batch"] or n
        sched = self.components.scheduler
        sums: dict[int, torch.Tensor] = {}
        for start in range(0, n, chunk):
            members = range(start, min(start + chunk, n))
            noise = torch.cat([_noise(latents.shape, seed + k) for k in members]).to(latents)
            steps = torch.full((len(members),), t, dtype=torch.long)
            noisy = sched.add_noise(latents.expand(len(members), -1, -1, -1), noise, steps)
            for i, f in unet_up_features(self.components, noisy, t, text, self.conf["up_blocks"]).items():
                part = f.float().sum(0, keepdim=True)
                sums[i] = sums[i] + part if i in sums else part
        return sums

    def describe(
        self, image: torch.Tensor, keypoints: torch.Tensor, modality: Modality | None = None
    ) -> dict[str, torch.Tensor]:
        """Features at keypoints: ``{"sd_up{i}": [N, C_i]}`` (float32, not normalised).

        Args:
            image: ``[1, 3, H, W]`` in ``[0, 1]`` (optical or SAR, 3 channels).
            keypoints: ``[N, 2]`` (x, y) pixels of ``image`` (pixel centres at integers).
            modality: "optical" or "sar" (prompt template); default ``conf["modality"]``.
        """
        maps = self.dense(image, modality=modality)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        kp = keypoints.float().cpu()
        return {name: sample_features(m, kp, size).to(keypoints.device) for name, m in maps.items()}

    def info(self) -> dict[str, str]:
        """Model description for ``result.json`` (all values are strings)."""
        info = {
            "name": self.name,
            "model": self.model,
            "lora": self.lora or "",
            "land_use": self.land_use,
            "prompt": self.last_prompt,
            "timestep": str(self.conf["timestep"]),
            "up_blocks": ",".join(map(str, self.conf["up_blocks"])),
            "ensemble": str(self.conf["ensemble"]),
            "long_side": str(self.conf["long_side"]),
        }
        if self.last_selection is not None:
            info["land_use_class"] = self.last_selection[0]
            info["land_use_scores"] = json.dumps({k: round(v, 6) for k, v in self.last_selection[1].items()})
        return info


def _noise(shape: torch.Size, seed: int) -> torch.Tensor:
    """Standard normal noise ``[1, *shape[1:]]`` from a CPU generator seeded with ``seed``."""
    return torch.randn((1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(seed))
