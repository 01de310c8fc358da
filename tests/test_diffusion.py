"""Diffusion branch: loading, DIFT features, prompts, land-use selection, PromptDM fine-tuning.

All tests use a tiny random SD model saved in diffusers layout (tests/diffusion_fixtures.py)
and loaded through the same code path as a user's model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_fixtures import make_tiny_sd  # noqa: E402

from promptmid.errors import InputError, ModelError  # noqa: E402
from promptmid.models.base import FeatureSource  # noqa: E402
from promptmid.models.base import PairContext  # noqa: E402
from promptmid.models.diffusion import DiffusionFeatures  # noqa: E402
from promptmid.models.sd import load_sd_components  # noqa: E402
from promptmid.models.prompts import load_prompt_set, prompt_for  # noqa: E402
from promptmid.training.finetune_dm import finetune_dm, read_image_list  # noqa: E402



@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def features(sd_dir) -> DiffusionFeatures:
    return DiffusionFeatures(str(sd_dir), land_use="water", ensemble=2, long_side=128)


def textured(size: int = 128, seed: int = 0, width: int | None = None) -> torch.Tensor:
    """A ``[1, 3, size, width or size]`` image with structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    h, w = size, width or size
    coarse = torch.rand(1, 1, h // 16, w // 16, generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    img = 0.7 * img + 0.3 * torch.rand(1, 1, h, w, generator=g)
    return img.expand(1, 3, h, w).contiguous()


def water(rng: np.random.Generator, s: int = 64) -> np.ndarray:
    """Smooth dark image (class "water")."""
    y, x = np.mgrid[0:s, 0:s] / s
    a = 0.15 + 0.08 * np.sin(2 * np.pi * (x * rng.uniform(0.5, 1.5) + rng.uniform())) * np.cos(2 * np.pi * y)
    return np.repeat(a[..., None], 3, -1).astype(np.float32)


def urban(rng: np.random.Generator, s: int = 64) -> np.ndarray:
    """Bright grid texture (class "urban")."""
    p, o = int(rng.integers(6, 10)), rng.integers(0, 10, 2)
    y, x = np.mgrid[0:s, 0:s]
    grid = (((x + o[0]) % p) < 2) | (((y + o[1]) % p) < 2)
    a = np.clip(np.where(grid, 0.95, 0.7) + rng.normal(0, 0.03, (s, s)), 0, 1)
    return np.repeat(a[..., None], 3, -1).astype(np.float32)


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)[None]


# ----------------------------------------------------------------------------- features


def test_protocol_shapes_and_strides(features):
    assert isinstance(features, FeatureSource)
    assert features.strides() == {"sd_up1": 16, "sd_up2": 8}
    dense = features.dense(textured(128))
    assert dense["sd_up1"].shape == (1, 64, 8, 8)
    assert dense["sd_up2"].shape == (1, 32, 16, 16)
    kps = torch.tensor([[0.0, 0.0], [63.5, 20.0], [127.0, 127.0]])
    ctx = PairContext()
    out = features.describe(textured(128), kps, modality="optical", context=ctx)
    assert out["sd_up1"].shape == (3, 64) and out["sd_up2"].shape == (3, 32)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert ctx.prompts == {"optical": "an optical satellite image of water"}
    assert features.info()["model"].endswith("tiny_sd0")


def test_non_multiple_of_64_is_resized(features):
    out = features.dense(textured(100))  # long side 100 -> 128 (= long_side), multiple of 64
    assert out["sd_up1"].shape[-2:] == (8, 8)


def test_prompt_and_modality_change_features(features):
    img = textured(128)
    a = features.dense(img, prompt="an optical satellite image of water")["sd_up1"]
    b = features.dense(img, prompt="an optical satellite image of urban")["sd_up1"]
    assert not torch.allclose(a, b, atol=1e-5)
    ctx = PairContext()
    features.describe(img, torch.zeros(1, 2), modality="sar", context=ctx)
    assert ctx.prompts["sar"] == "a SAR satellite image of water"


def test_ensemble_is_mean_of_single_draws(sd_dir):
    img = textured(128)
    kw = dict(land_use="forest", long_side=128)
    pair = DiffusionFeatures(str(sd_dir), ensemble=2, seed=5, **kw).dense(img)
    one = DiffusionFeatures(str(sd_dir), ensemble=1, seed=5, **kw).dense(img)
    two = DiffusionFeatures(str(sd_dir), ensemble=1, seed=6, **kw).dense(img)
    for name in pair:
        assert torch.allclose(pair[name], (one[name] + two[name]) / 2, atol=1e-4)
        assert not torch.allclose(one[name], two[name], atol=1e-4)


def test_features_shift_with_the_image(sd_dir):
    """Shift a 128x192 image by 64 px: dense maps shift by 64/stride cells, keypoints follow.

    A random UNet is only roughly translation-equivariant (zero padding, global attention,
    noise fixed to the latent grid), so maps are compared after removing their mean vector,
    against the same maps flipped (misaligned).
    """
    features = DiffusionFeatures(str(sd_dir), land_use="water", ensemble=2, long_side=192)
    big = textured(128, seed=3, width=256)
    left, right = big[..., :192], big[..., 64:]  # right = left shifted by 64 px in x
    maps_l, maps_r = features.dense(left), features.dense(right)
    for name, stride in features.strides().items():
        s = 64 // stride
        a, b = maps_l[name][..., s:], maps_r[name][..., : maps_r[name].shape[-1] - s]
        a, b = a - a.mean((2, 3), keepdim=True), b - b.mean((2, 3), keepdim=True)
        aligned = torch.nn.functional.cosine_similarity(a, b, dim=1).mean()
        misaligned = torch.nn.functional.cosine_similarity(a, b.flip(-1).flip(-2), dim=1).mean()
        assert aligned > 0.3 and aligned > misaligned + 0.25, (name, aligned, misaligned)
    ys, xs = torch.meshgrid(torch.arange(12.0, 120, 24), torch.arange(76.0, 188, 24), indexing="ij")
    kps_l = torch.stack([xs.flatten(), ys.flatten()], 1)  # 25 points in the overlap
    kps_r = kps_l - torch.tensor([64.0, 0.0])
    fl, fr = features.describe(left, kps_l)["sd_up2"], features.describe(right, kps_r)["sd_up2"]
    fl, fr = (torch.nn.functional.normalize(f - f.mean(0), dim=1) for f in (fl, fr))
    correct = (fl @ fr.T).argmax(1) == torch.arange(len(kps_l))
    assert correct.float().mean() >= 0.8, correct


# ----------------------------------------------------------------------------- loading / errors


def test_missing_directory_and_files_give_clear_error(sd_dir, tmp_path):
    with pytest.raises(ModelError, match="not found.*stable-diffusion-2-1"):
        load_sd_components(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(sd_dir, broken)
    shutil.rmtree(broken / "tokenizer")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        load_sd_components(str(broken))
    msg = str(err.value)
    assert "tokenizer/" in msg and "unet/diffusion_pytorch_model" in msg and "hf download" in msg


def test_offline_hub_id_is_a_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline"):
        load_sd_components("someone/not-a-cached-model")


def test_bad_lora_is_rejected(sd_dir, tmp_path):
    with pytest.raises(ModelError, match="LoRA adapter not found"):
        load_sd_components(str(sd_dir), lora=str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["no_such_layer"]})
    )
    from safetensors.torch import save_file

    save_file({"x.lora_A.weight": torch.zeros(4, 4)}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match="does not"):
        load_sd_components(str(sd_dir), lora=str(bad))


# ----------------------------------------------------------------------------- prompts


def test_prompt_templates_and_files(tmp_path):
    assert prompt_for("forest", "optical") == "an optical satellite image of forest"
    assert prompt_for("road", "sar") == "a SAR satellite image of road"
    (tmp_path / "p.txt").write_text("# mine\nwater\nurban\n")
    assert load_prompt_set(tmp_path / "p.txt").classes == ("water", "urban")
    (tmp_path / "p.json").write_text(json.dumps({"classes": ["ice"], "templates": {"sar": "radar of {class}"}}))
    ps = load_prompt_set(tmp_path / "p.json")
    assert ps.prompt_for("ice", "sar") == "radar of ice"
    (tmp_path / "p.yaml").write_text("classes: [a, b]\n")
    assert load_prompt_set(tmp_path / "p.yaml").classes == ("a", "b")
    (tmp_path / "bad.json").write_text(json.dumps({"templates": {"optical": "no placeholder"}}))
    with pytest.raises(InputError, match="placeholder"):
        load_prompt_set(tmp_path / "bad.json")
    with pytest.raises(InputError, match="Unknown land-use class"):
        ps.check_class("desert")


def test_auto_and_average_land_use(sd_dir):
    feats = DiffusionFeatures(str(sd_dir), land_use="auto", ensemble=1, long_side=64, selection_noise=1)
    cls, scores = feats.choose_land_use(textured(64))
    assert cls in scores and len(scores) == 9 and scores[cls] == min(scores.values())
    # the pair's class is chosen on the optical image and shared by the SAR image, in the context only
    ctx = PairContext()
    feats.begin_pair(textured(64), ctx)
    assert ctx.land_use == cls and ctx.land_use_scores == scores
    feats.describe(textured(64, seed=3), torch.zeros(1, 2), modality="sar", context=ctx)
    assert ctx.prompts["sar"] == f"a SAR satellite image of {cls}"
    assert json.loads(json.dumps(ctx.to_dict()))["land_use_class"] == cls
    avg = DiffusionFeatures(str(sd_dir), land_use="average", ensemble=1, long_side=64)
    ctx = PairContext()
    assert avg.dense(textured(64), context=ctx)["sd_up1"].shape == (1, 64, 4, 4)
    assert ctx.prompts["optical"].startswith("average of 9 prompts")


# ----------------------------------------------------------------------------- PromptDM


def training_items(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [(water(rng), "water", "optical") for _ in range(n)] + [(urban(rng), "urban", "optical") for _ in range(n)]


@pytest.mark.slow
def test_finetune_lowers_loss_roundtrips_and_resumes(sd_dir, tmp_path):
    items = training_items(3, seed=0)
    out = tmp_path / "ft"
    kw = dict(rank=4, lr=2e-3, batch=4, crop=64, checkpoint_every=5, progress=False)
    first = finetune_dm(str(sd_dir), items, out, steps=10, resume=False, **kw)
    assert (out / "checkpoints" / "step_000005" / "state.pt").is_file()
    resumed = finetune_dm(str(sd_dir), items, out, steps=30, **kw)
    assert resumed["start_step"] == 10 and len(resumed["losses"]) == 30
    assert resumed["losses"][:10] == first["losses"]
    assert resumed["eval_loss_final"] < first["eval_loss_initial"] * 0.95

    img = as_tensor(water(np.random.default_rng(9)))
    base = DiffusionFeatures(str(sd_dir), land_use="water", ensemble=1, long_side=64)
    tuned = DiffusionFeatures(str(sd_dir), lora=resumed["adapter"], land_use="water", ensemble=1, long_side=64)
    again = DiffusionFeatures(str(sd_dir), lora=resumed["adapter"], land_use="water", ensemble=1, long_side=64)
    a, b, c = base.dense(img)["sd_up2"], tuned.dense(img)["sd_up2"], again.dense(img)["sd_up2"]
    assert torch.equal(b, c) and not torch.allclose(a, b, atol=1e-4)
    assert tuned.info()["lora"] == resumed["adapter"]


def test_read_image_list(tmp_path):
    from PIL import Image

    Image.fromarray((water(np.random.default_rng(0)) * 255).astype(np.uint8)).save(tmp_path / "w.png")
    (tmp_path / "list.csv").write_text("image,class,modality\nw.png,water,optical\nw.png,,sar\n")
    items = read_image_list(tmp_path / "list.csv")
    assert items[0][1:] == ("water", "optical") and items[1][1:] == (None, "sar")
    (tmp_path / "bad.csv").write_text("image,class,modality\nmissing.png,water,optical\n")
    with pytest.raises(InputError, match="not found"):
        read_image_list(tmp_path / "bad.csv")


# ----------------------------------------------------------------------------- also-fix regressions


def test_unset_tokenizer_length_is_clamped_to_the_text_encoder(sd_dir, tmp_path):
    """A tokenizer without ``model_max_length`` (transformers reports ~1e30) must not overflow: the prompt
    length is clamped to the text encoder's ``max_position_embeddings``."""
    from promptmid.models.sd import encode_prompt, prompt_length

    copy = shutil.copytree(sd_dir, tmp_path / "sd_nolen")
    config_file = copy / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["model_max_length"]
    config_file.write_text(json.dumps(config))
    components = load_sd_components(copy)
    assert components.tokenizer.model_max_length > 1e20
    assert prompt_length(components) == components.text_encoder.config.max_position_embeddings
    emb = encode_prompt(components, "an optical satellite image of water")
    assert emb.shape[1] == components.text_encoder.config.max_position_embeddings
    feats = DiffusionFeatures(str(copy), land_use="water", ensemble=1, long_side=64)
    assert feats.dense(textured(64))["sd_up1"].shape[0] == 1


def test_result_land_use_scores_is_a_json_object(sd_dir, tmp_path):
    """result.json's ``pair_context.land_use_scores`` is an object of numbers, not a JSON string."""
    from promptmid.api import Matcher
    from promptmid.outputs import write_json

    overrides = {"sources": {"diffusion": {"model": str(sd_dir), "land_use": "auto", "ensemble": 1, "long_side": 64,
                                           "selection_noise": 1}},
                 "keypoints": {"top_k": 128}, "aggregator": {"name": "concat"}}  # the tiny SD's features
    result = Matcher("full", overrides).match(textured(128)[0].permute(1, 2, 0).numpy(),
                                              textured(128, seed=1)[0].permute(1, 2, 0).numpy())
    write_json(tmp_path / "result.json", result.to_dict())  # how match writes result.json
    context = json.loads((tmp_path / "result.json").read_text())["pair_context"]
    scores = context["land_use_scores"]
    assert isinstance(scores, dict) and len(scores) == 9
    assert all(isinstance(v, float) for v in scores.values())
    assert context["land_use_class"] == min(scores, key=scores.get)
