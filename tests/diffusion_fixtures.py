"""Tiny, randomly initialised Stable Diffusion components for tests and benchmarks.

No diffusion or CLIP weights exist on these machines, so tests build a miniature model
with the same *layout* as SD 2.1 (4-block UNet with cross-attention, 8x VAE, CLIP text
encoder + BPE tokenizer, DDPM scheduler), save it with ``save_pretrained`` in diffusers
layout (``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``) and load it
back through :func:`promptmid.models.sd.load_sd_components`, exactly like a
user's model directory.

Strides match SD: latent at 1/8 of the image, up-block 1 output at 1/16, up-block 2 at 1/8.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_UNET_CHANNELS = (32, 32, 64, 64)
TEXT_DIM = 32
MAX_TOKENS = 77  # tokenizer/text-encoder context length, as in SD (prompts are byte-level here)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_tokenizer(directory: Path) -> int:
    """Write a minimal CLIP BPE tokenizer (vocab.json, merges.txt, configs).

    The vocabulary holds every byte symbol, with and without the end-of-word marker
    ``</w>``, a handful of merges for common letters pairs, and the special tokens.
    Returns the vocabulary size.
    """
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    merges = ["a t", "i n", "o f", "e r", "a n", "r e", "o n", "s a", "a g"]
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return len(vocab)


def tiny_unet_config(
    block_out_channels: tuple[int, ...] = TINY_UNET_CHANNELS, cross_attention_dim: int = TEXT_DIM
) -> dict:
    """UNet2DConditionModel config with SD 2.1's block layout at miniature width."""
    n = len(block_out_channels)
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=True,
    )


def sd21_unet_config() -> dict:
    """UNet2DConditionModel config of Stable Diffusion 2.1 (865 M parameters)."""
    return dict(
        sample_size=96,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )


def sd21_vae_config() -> dict:
    """AutoencoderKL config of Stable Diffusion 2.1."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        sample_size=768,
        scaling_factor=0.18215,
    )


def make_tiny_sd(directory: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build and save a tiny random SD model in diffusers layout; return its directory.

    Args:
        directory: target directory (created).
        seed: torch seed for the random initialisation (same seed -> same weights).
        prediction_type: scheduler prediction type ("epsilon" or "v_prediction").
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_size = write_tiny_tokenizer(root / "tokenizer")
    UNet2DConditionModel(**tiny_unet_config()).save_pretrained(root / "unet")
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    calibrate_vae(vae)
    vae.save_pretrained(root / "vae")
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    CLIPTextModel(text_config).save_pretrained(root / "text_encoder")
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    ).save_pretrained(root / "scheduler")
    _write_model_index(root)
    return root


def calibration_images(n: int = 16, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``[n, 3, size, size]`` varied images in [0, 1]: brightness levels, ramps, grids, noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for i in range(n):
        level = torch.rand(1, generator=g).item()
        period = int(torch.randint(4, 12, (1,), generator=g))
        pattern = [xx / size, ((xx % period) < 2) | ((yy % period) < 2), torch.zeros(size, size)][i % 3].float()
        noise = 0.1 * torch.rand(size, size, generator=g)
        out.append((0.6 * level + 0.3 * pattern + noise).clamp(0, 1).expand(3, -1, -1))
    return torch.stack(out)


@torch.no_grad()
def calibrate_vae(vae: torch.nn.Module) -> None:
    """Set ``shift_factor``/``scaling_factor`` so latents of varied images have mean 0, std 1.

    A random VAE's raw latents barely vary between images (std ~0.2 around a common offset);
    SD's own scaling factor was chosen the same way (unit-variance latents), so the tiny model
    sees image content at a realistic signal-to-noise ratio.
    """
    latents = vae.encode(calibration_images() * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1.0 / latents.std()))


def _write_model_index(root: Path) -> None:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
