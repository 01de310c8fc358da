"""Land-use text prompts for the diffusion branch, and zero-shot land-use selection.

PromptMID conditions the diffusion UNet on a land-use prompt (README, 'Pipeline and presets'). The
default prompt set has 9 classes and one template per modality::

    optical: "an optical satellite image of {class}"
    sar:     "a SAR satellite image of {class}"

A prompt set can be replaced from a file (:func:`load_prompt_set`):

* ``.json`` / ``.yaml`` / ``.yml``: ``{"classes": [...], "templates": {"optical": "...", "sar": "..."}}``
  (either key may be omitted; templates must contain ``{class}``);
* anything else (``.txt``): one class per line, ``#`` starts a comment; default templates.

:func:`select_land_use` is a zero-shot *diffusion classifier* (Li et al., ICCV 2023):
the class whose prompt lets the UNet predict the added noise best (lowest
ε-prediction MSE; v-prediction models use the velocity target) is chosen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from promptmid.errors import InputError
from promptmid.models.base import Modality
from promptmid.models.sd import SDComponents, denoising_target, encode_latents, encode_prompt

LAND_USE_CLASSES: tuple[str, ...] = (
    "farmland",
    "forest",
    "grassland",
    "water",
    "urban",
    "rural settlement",
    "road",
    "bare land",
    "mountain",
)
TEMPLATES: dict[str, str] = {
    "optical": "an optical satellite image of {class}",
    "sar": "a SAR satellite image of {class}",
}
# Timesteps (of 1000 training steps) scored by the classifier. Below ~100 the noisy latent
# is almost the image and every prompt predicts the noise equally well; above ~800 the
# error is dominated by the unpredictable noise itself. Mid-range steps carry the signal.
SELECTION_TIMESTEPS: tuple[int, ...] = (100, 300, 500, 700)
# class name meaning "no land-use label": the prompt is the template without " of {class}"
GENERIC = "generic"


@dataclass(frozen=True)
class PromptSet:
    """Land-use classes and per-modality templates (placeholder ``{class}``)."""

    classes: tuple[str, ...] = LAND_USE_CLASSES
    templates: dict[str, str] = field(default_factory=lambda: dict(TEMPLATES))

    def prompt_for(self, cls: str, modality: Modality = "optical") -> str:
        """The text prompt of class ``cls`` for an image of ``modality``; :data:`GENERIC` gives the template
        without its land-use part ("a SAR satellite image")."""
        if modality not in self.templates:
            raise InputError(f"Unknown modality {modality!r}; expected one of {sorted(self.templates)}.")
        if cls == GENERIC:
            return self.templates[modality].replace(" of {class}", "").replace("{class}", "").strip()
        return self.templates[modality].replace("{class}", cls)

    def check_class(self, cls: str) -> str:
        """Return ``cls`` if it is a known class (or :data:`GENERIC`), else raise :class:`InputError`."""
        if cls not in self.classes and cls != GENERIC:
            raise InputError(f"Unknown land-use class {cls!r}; choose one of {list(self.classes)}.")
        return cls


DEFAULT_PROMPTS = PromptSet()


def prompt_for(cls: str, modality: Modality = "optical", prompt_set: PromptSet = DEFAULT_PROMPTS) -> str:
    """The prompt of land-use class ``cls`` for ``modality`` ("optical" or "sar")."""
    return prompt_set.prompt_for(cls, modality)


def load_prompt_set(path: str | Path) -> PromptSet:
    """Read a prompt set from a JSON, YAML or text file (format in the module docstring).

    Raises:
        InputError: missing file, unreadable content, no classes, or a template without ``{class}``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = _parse_prompt_file(path, text)
    except (ValueError, TypeError) as exc:  # json/yaml errors derive from ValueError or are wrapped
        raise InputError(f"Cannot parse prompt file {path}: {exc}") from exc
    classes = tuple(str(c).strip() for c in data.get("classes", LAND_USE_CLASSES) if str(c).strip())
    templates = {**TEMPLATES, **{str(k): str(v) for k, v in (data.get("templates") or {}).items()}}
    if not classes:
        raise InputError(f"Prompt file {path} lists no land-use classes.")
    bad = [m for m, t in templates.items() if "{class}" not in t]
    if bad:
        raise InputError(f"Prompt file {path}: template(s) {bad} lack the '{{class}}' placeholder.")
    return PromptSet(classes=classes, templates=templates)


def _parse_prompt_file(path: Path, text: str) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(str(exc)) from exc
    else:
        lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
        data = {"classes": [line for line in lines if line]}
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict):
        raise TypeError("expected a mapping with 'classes' and/or 'templates', or a list of classes")
    return data


@torch.no_grad()
def select_land_use(
    components: SDComponents,
    image: torch.Tensor,
    modality: Modality = "optical",
    classes: tuple[str, ...] | list[str] | None = None,
    prompt_set: PromptSet = DEFAULT_PROMPTS,
    timesteps: tuple[int, ...] = SELECTION_TIMESTEPS,
    n_noise: int = 2,
    seed: int = 0,
    embed: dict[str, torch.Tensor] | None = None,
) -> tuple[str, dict[str, float]]:
    """Zero-shot land-use classification with the diffusion model itself.

    For every (timestep, noise draw) the image latent is noised once and the UNet predicts
    the noise under each class prompt (one batch over classes, the *same* noise for every
    class, so the comparison is paired). The score of a class is its prediction MSE
    averaged over timesteps and draws; the lowest score wins.

    Args:
        components: loaded SD components (LoRA already applied for PromptDM).
        image: ``[1, 3, H, W]`` in ``[0, 1]``, both sides multiples of 64 (see
            :func:`promptmid.models.diffusion.prepare_image`).
        modality: template used for the prompts.
        classes: candidate classes (default: all of ``prompt_set``).
        timesteps: diffusion timesteps scored (0 .. num_train_timesteps-1).
        n_noise: noise draws per timestep.
        seed: seed of the noise draws.
        embed: optional cache prompt -> ``[1, L, D]`` text embedding (filled in).

    Returns:
        ``(best_class, {class: mean MSE})`` (lower MSE = better fit).
    """
    classes = tuple(classes or prompt_set.classes)
    cache = {} if embed is None else embed
    text = torch.cat([encode_prompt(components, prompt_set.prompt_for(c, modality), cache) for c in classes])
    latents = encode_latents(components, image)
    generator = torch.Generator("cpu").manual_seed(seed)
    totals = torch.zeros(len(classes), dtype=torch.float64)
    for t in timesteps:
        for _ in range(n_noise):
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            steps = torch.full((1,), int(t), dtype=torch.long, device=latents.device)
            target = denoising_target(components.scheduler, latents, noise, steps)
            totals += _class_errors(components, latents, noise, target, steps, text)
    scores = totals / (len(timesteps) * n_noise)
    best = classes[int(scores.argmin())]
    return best, {c: float(s) for c, s in zip(classes, scores)}


def _class_errors(
    components: SDComponents,
    latents: torch.Tensor,
    noise: torch.Tensor,
    target: torch.Tensor,
    steps: torch.Tensor,
    text: torch.Tensor,
) -> torch.Tensor:
    """Per-class prediction MSE ``[K]`` for one noisy latent ``[1,4,h,w]`` (batch over the K prompts)."""
    k = text.shape[0]
    noisy = components.scheduler.add_noise(latents, noise, steps)
    pred = components.unet(noisy.expand(k, -1, -1, -1), steps.expand(k), encoder_hidden_states=text).sample
    return ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3)).double().cpu()
