"""Prompt-conditioned Stable Diffusion features (the diffusion branch of PromptMID).

DIFT-style one-step features (README, 'Pipeline and presets'): the image is VAE-encoded, noised at one
timestep ``t``, passed once through the UNet with a land-use prompt embedding, and the
outputs of chosen UNet up-blocks are kept (SD 2.1: up-block 1 = 1280 ch at 1/16 of the
image, up-block 2 = 640 ch at 1/8), averaged over an ensemble of noise draws, and sampled
at keypoints with :func:`promptmid.models.sampling.sample_features`.

Loading, LoRA and the SD primitives live in :mod:`promptmid.models.sd`; this module is the feature
source only.

Coordinates follow :mod:`promptmid.models.sampling`: keypoints are ``(x, y)`` pixels of the
image passed to :meth:`DiffusionFeatures.describe`, pixel centres at integers.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from promptmid.config import DIFFUSION_DEFAULTS, merge_options
from promptmid.errors import InputError
from promptmid.models.base import PairContext
from promptmid.models.land_use import SELECTION_TIMESTEPS, select_land_use
from promptmid.models.prompts import DEFAULT_PROMPTS, PromptSet, load_prompt_set
from promptmid.geometry import Size
from promptmid.models.sampling import sample_features
from promptmid.models.promptdm import PROMPTS as PROMPTDM_PROMPTS, PixelSpace, load_components
from promptmid.models.sd import (
    SDComponents,
    encode_latents,
    encode_prompt,
    prepare_image,
    unet_up_features,
    up_block_geometry,
)

if TYPE_CHECKING:
    from promptmid.io import Modality

class DiffusionFeatures:
    """Feature source: prompt-conditioned SD up-block features at keypoints (DIFT-style).

    Usage::

        sd = DiffusionFeatures("path/to/sd21", lora="promptdm/adapter", land_use="auto")
        ctx = PairContext()
        sd.begin_pair(optical, ctx)                     # land-use class chosen on the optical image
        f_opt = sd.describe(optical, kps_opt, modality="optical", context=ctx)
        f_sar = sd.describe(sar, kps_sar, modality="sar", context=ctx)  # {"sd_up1": [N,1280], "sd_up2": [N,640]}
        ctx.land_use, ctx.prompts                       # what was used, for result.json

    Land use (``land_use``): ``"auto"`` picks the class with the diffusion classifier
    (:func:`promptmid.models.land_use.select_land_use`) on the optical image in :meth:`begin_pair`
    (or, without it, on the first image described with that context), so both images of a pair share
    the class; ``"average"`` uses the mean prompt embedding over all classes; any class name fixes
    that class. ``conf["prompt"]`` (a literal text) overrides all of this. The modality selects
    the template ("an optical satellite image of {class}" / "a SAR satellite image of {class}").
    The object keeps no per-pair state: everything per pair lives in the :class:`PairContext`.
    """

    name = "diffusion"
    default_conf: dict[str, Any] = {
        "timestep": 40,  # diffusion timestep t of the single noising step (0..999); DIFT/DESIGN: small t
        "up_blocks": (1, 2),  # UNet up-blocks whose outputs are kept (SD 2.1: 1 -> 1280ch @1/16, 2 -> 640ch @1/8)
        "ensemble": DIFFUSION_DEFAULTS["ensemble"],  # noise draws averaged per image (8 for quality runs)
        "ensemble_batch": 0,  # draws per UNet batch; 0 = all at once (lower it to cap memory)
        "long_side": 512,  # input resized so the long side is ~this (px), sides rounded to multiples of 64; None = keep
        "prompt": None,  # literal prompt text overriding land-use prompts (same for both modalities)
        "prompt_file": None,  # JSON/YAML/text file replacing land-use classes/templates (prompts.load_prompt_set)
        "seed": 0,  # noise of ensemble member k is drawn with seed + k (reproducible, shared by both images)
        "selection_timesteps": SELECTION_TIMESTEPS,  # timesteps scored by the land-use classifier
        "selection_noise": 2,  # noise draws per timestep for the land-use classifier
        "selection_long_side": None,  # long side (px) of the image the classifier scores; None = long_side
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
        self.conf = merge_options(self.default_conf, conf, "DiffusionFeatures")
        self.conf["up_blocks"] = tuple(int(i) for i in self.conf["up_blocks"])
        self.model, self.lora, self.land_use = str(model), lora, land_use
        self.components = load_components(model, lora=lora, device=device, dtype=self._dtype(device))
        self.prompts: PromptSet = load_prompt_set(self.conf["prompt_file"]) if self.conf["prompt_file"] else \
            default_prompts(self.components)
        if land_use not in ("auto", "average"):
            self.prompts.check_class(land_use)
        self.geometry = up_block_geometry(self.components.unet, self.components.vae)
        bad = [i for i in self.conf["up_blocks"] if i not in self.geometry]
        if bad:
            raise ValueError(f"up_blocks {bad} do not exist; this UNet has up-blocks {sorted(self.geometry)}.")
        if self.conf["attention_slicing"]:
            self.components.unet.set_attention_slice("auto")
        self._text_cache: dict[str, torch.Tensor] = {}  # prompt text -> embedding (a pure cache)

    def _dtype(self, device: str) -> torch.dtype:
        if self.conf["fp16"] and not str(device).startswith("cuda"):
            warnings.warn("fp16 is only used on CUDA devices; running in float32.", stacklevel=3)
            return torch.float32
        return torch.float16 if self.conf["fp16"] else torch.float32

    # ----------------------------------------------------------------- configuration

    def begin_pair(self, optical: torch.Tensor, context: PairContext) -> None:
        """With ``land_use="auto"`` (and no literal prompt), choose the pair's class on the optical image
        ``[1, 3, H, W]`` and record it (and the class scores) in ``context``."""
        if self.land_use == "auto" and not self.conf["prompt"]:
            context.land_use, context.land_use_scores = self.choose_land_use(optical, "optical")

    def choose_land_use(self, image: torch.Tensor, modality: Modality = "optical") -> tuple[str, dict[str, float]]:
        """Classify ``image`` ``[1,3,H,W]`` (in [0, 1], any size) with the diffusion classifier: ``(class, scores)``."""
        return self._classify(image, modality)

    def _classify(self, image: torch.Tensor, modality: Modality) -> tuple[str, dict[str, float]]:
        """The classifier on ``image`` resized to ``selection_long_side`` (or ``long_side``)."""
        prepared = prepare_image(image, self.conf["selection_long_side"] or self.conf["long_side"])
        return select_land_use(
            self.components, prepared, modality=modality, prompt_set=self.prompts,
            timesteps=tuple(self.conf["selection_timesteps"]), n_noise=self.conf["selection_noise"],
            seed=self.conf["seed"], embed=self._text_cache,
        )  # fmt: skip

    def strides(self) -> dict[str, int]:
        """Feature-map stride (image pixels per cell, after :func:`prepare_image`) of each output."""
        return {f"sd_up{i}": self.geometry[i][1] for i in self.conf["up_blocks"]}

    def channels(self) -> dict[str, int]:
        """Channel count of each output."""
        return {f"sd_up{i}": self.geometry[i][0] for i in self.conf["up_blocks"]}

    # ----------------------------------------------------------------- features

    def conditioning(self, image: torch.Tensor | None, modality: Modality, context: PairContext) -> torch.Tensor:
        """Prompt embedding ``[1, L, D]`` for ``image`` (prepared) in ``modality``; the text used goes to
        ``context.prompts[modality]``."""
        if self.conf["prompt"]:
            text = str(self.conf["prompt"])
        elif self.land_use == "average" and context.land_use is None:
            texts = [self.prompts.prompt_for(c, modality) for c in self.prompts.classes]
            context.prompts[modality] = f"average of {len(texts)} prompts: {texts[0]} ..."
            return torch.stack([encode_prompt(self.components, t, self._text_cache) for t in texts]).mean(0)
        else:
            text = self.prompts.prompt_for(self._class_for(image, modality, context), modality)
        context.prompts[modality] = text
        return encode_prompt(self.components, text, self._text_cache)

    def _class_for(self, image: torch.Tensor | None, modality: Modality, context: PairContext) -> str:
        if context.land_use is not None:
            return self.prompts.check_class(context.land_use)
        if self.land_use != "auto":
            return self.land_use
        if image is None:
            raise InputError("land_use='auto' needs an image (or a context whose land_use is set).")
        # no begin_pair: classify this image and keep the class for the rest of the pair
        context.land_use, context.land_use_scores = self._classify(image, modality)
        return context.land_use

    def dense(
        self, image: torch.Tensor, prompt: str | None = None, modality: Modality = "optical",
        context: PairContext | None = None,
    ) -> dict[str, torch.Tensor]:
        """Dense features ``{"sd_up{i}": [1, C_i, h_i, w_i]}`` (float32, CPU) of ``[1,3,H,W]`` in [0,1].

        The maps cover the whole input image; cell size = ``strides()`` pixels of the image
        resized by :func:`prepare_image`. ``prompt`` (text) overrides the land-use prompt;
        ``context`` is the pair's (a fresh one when ``None``).
        """
        context = context if context is not None else PairContext()
        x = prepare_image(image, self.conf["long_side"])
        if prompt is not None:
            context.prompts[modality] = prompt
            text = encode_prompt(self.components, prompt, self._text_cache)
        else:
            text = self.conditioning(x, modality, context)
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
        self, image: torch.Tensor, keypoints: torch.Tensor, *, modality: Modality = "optical",
        context: PairContext | None = None,
    ) -> dict[str, torch.Tensor]:
        """Features at keypoints: ``{"sd_up{i}": [N, C_i]}`` (float32, not normalised).

        Args:
            image: ``[1, 3, H, W]`` in ``[0, 1]`` (optical or SAR, 3 channels).
            keypoints: ``[N, 2]`` (x, y) pixels of ``image`` (pixel centres at integers).
            modality: "optical" or "sar" (prompt template).
            context: the pair's :class:`PairContext` (land-use class in, prompt used out).
        """
        maps = self.dense(image, modality=modality, context=context)
        size = Size.of(image)
        kp = keypoints.float().cpu()
        return {name: sample_features(m, kp, size).to(keypoints.device) for name, m in maps.items()}

    def info(self) -> dict[str, str]:
        """Model description for ``result.json`` (all values are strings; what was used for a pair is in
        its :class:`PairContext`)."""
        return {
            "name": self.name,
            "model": self.model,
            "lora": self.lora or "",
            "land_use": self.land_use,
            "prompt": str(self.conf["prompt"] or ""),
            "timestep": str(self.conf["timestep"]),
            "up_blocks": ",".join(map(str, self.conf["up_blocks"])),
            "ensemble": str(self.conf["ensemble"]),
            "long_side": str(self.conf["long_side"]),
        }


def default_prompts(components: SDComponents) -> PromptSet:
    """The land-use prompt set a model was trained with: the 3MOS scene classes for PromptDM-small
    (:data:`promptmid.models.promptdm.PROMPTS`), the 9 DESIGN classes for Stable Diffusion."""
    return PROMPTDM_PROMPTS if isinstance(components.vae, PixelSpace) else DEFAULT_PROMPTS


def _noise(shape: torch.Size, seed: int) -> torch.Tensor:
    """Standard normal noise ``[1, *shape[1:]]`` from a CPU generator seeded with ``seed``."""
    return torch.randn((1, *shape[1:]), generator=torch.Generator("cpu").manual_seed(seed))
