"""Zero-shot land-use selection with the diffusion model itself.

:func:`select_land_use` is a zero-shot *diffusion classifier* (Li et al., ICCV 2023): the class whose prompt (from a
:class:`~promptmid.models.prompts.PromptSet`) lets the UNet predict the added noise best (lowest ε-prediction MSE;
v-prediction models use the velocity target) is chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from promptmid.models.prompts import DEFAULT_PROMPTS, PromptSet
from promptmid.models.sd import SDComponents, denoising_target, encode_latents, encode_prompt

if TYPE_CHECKING:
    from promptmid.io import Modality

# Timesteps (of 1000 training steps) scored by the classifier. Below ~100 the noisy latent
# is almost the image and every prompt predicts the noise equally well; above ~800 the
# error is dominated by the unpredictable noise itself. Mid-range steps carry the signal.
SELECTION_TIMESTEPS: tuple[int, ...] = (100, 300, 500, 700)


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
