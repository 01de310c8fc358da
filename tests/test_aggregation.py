"""Trained aggregation modules: shapes, normalisation, save/load, refusal of bad weight files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from promptmid.errors import ModelError
from promptmid.models.aggregation import (
    SHIPPED, WEIGHTS_DIR, ConcatFusion, PromptMIDAggregator, load_aggregator, load_aggregator_file,
    save_aggregator,
)

SOURCES = {"xfeat": 64, "dinov2_l4": 384, "dinov2_l8": 384, "dinov2_l12": 384}


def _features(n: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(n, c, generator=g) for k, c in SOURCES.items()}
    return feats, torch.rand(n, 2, generator=g) * 200


@pytest.mark.parametrize("conf", [
    {}, {"texture_semantic": False}, {"local_global": False}, {"global_tokens": 0},
    {"sources": {"xfeat": 64}}, {"sources": {k: c for k, c in SOURCES.items() if k != "xfeat"}, "local": None},
])
def test_shapes_and_normalisation(conf):
    torch.manual_seed(0)
    model = PromptMIDAggregator(**conf).eval()
    feats, kpts = _features(300)
    with torch.no_grad():
        out = model(feats, kpts, (200, 220))
    assert out.shape == (300, 256)
    assert torch.allclose(out.norm(dim=-1), torch.ones(300), atol=1e-5)
    empty = model({k: v[:0] for k, v in feats.items()}, kpts[:0], (200, 220))
    assert empty.shape == (0, 256)


def test_descriptors_are_per_image_and_ignore_extra_sources():
    model = PromptMIDAggregator(local_global=False).eval()
    feats, kpts = _features(50)
    with torch.no_grad():
        a = model(feats, kpts, (200, 200))
        b = model({**feats, "sd_up1": torch.randn(50, 1280)}, kpts, (200, 200))
        # without the local-global block each keypoint's descriptor depends on itself only
        c = model({k: v[:10] for k, v in feats.items()}, kpts[:10], (200, 200))
    assert torch.equal(a, b)
    assert torch.allclose(a[:10], c, atol=1e-5)


def test_missing_source_is_a_clear_error():
    model = PromptMIDAggregator()
    feats, kpts = _features(5)
    del feats["dinov2_l8"]
    with pytest.raises(ValueError, match="dinov2_l8"):
        model(feats, kpts, (10, 10))


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="Unknown aggregator option"):
        PromptMIDAggregator(depth=3)


def test_concat_fusion_still_there():
    feats, kpts = _features(20)
    out = ConcatFusion({"xfeat": 1.0, "dinov2": 0.7})(feats, kpts, (200, 200))
    assert out.shape == (20, 64 + 3 * 384)
    assert torch.allclose(out.norm(dim=-1), torch.ones(20), atol=1e-5)


def test_save_load_identical_outputs(tmp_path: Path):
    torch.manual_seed(1)
    model = PromptMIDAggregator().eval()
    meta = save_aggregator(model, tmp_path / "agg.safetensors", info={"note": "test"})
    assert meta["sha256"] and meta["note"] == "test"
    loaded, meta2 = load_aggregator_file(tmp_path / "agg.safetensors")
    feats, kpts = _features(128)
    with torch.no_grad():
        assert torch.equal(model(feats, kpts, (200, 200)), loaded(feats, kpts, (200, 200)))
    agg = load_aggregator("custom", path=str(tmp_path / "agg.safetensors"))
    assert agg.name == "custom"
    assert torch.equal(agg(feats, kpts, (200, 200)), loaded(feats, kpts, (200, 200)))


def test_wrong_checksum_is_refused(tmp_path: Path):
    path = tmp_path / "agg.safetensors"
    save_aggregator(PromptMIDAggregator(), path)
    side = json.loads(Path(str(path) + ".json").read_text())
    side["sha256"] = "0" * 64
    Path(str(path) + ".json").write_text(json.dumps(side))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_aggregator_file(path)


def test_wrong_keys_are_refused(tmp_path: Path):
    from safetensors.torch import save_file

    from promptmid.models.weights import sha256_file

    path = tmp_path / "agg.safetensors"
    meta = save_aggregator(PromptMIDAggregator(), path)
    # a file of another architecture (no local-global block) under the full config
    state = PromptMIDAggregator(local_global=False).state_dict()
    state["extra.weight"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    meta["sha256"] = sha256_file(path)
    Path(str(path) + ".json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="missing keys.*unexpected keys"):
        load_aggregator_file(path)


def test_missing_files_are_refused(tmp_path: Path):
    with pytest.raises(ModelError, match="not found"):
        load_aggregator_file(tmp_path / "nope.safetensors")
    save_aggregator(PromptMIDAggregator(), tmp_path / "a.safetensors")
    Path(str(tmp_path / "a.safetensors") + ".json").unlink()
    with pytest.raises(ModelError, match="sidecar"):
        load_aggregator_file(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="Unknown aggregator"):
        load_aggregator("no-such-model")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_weights_load_and_are_small(name):
    path = WEIGHTS_DIR / SHIPPED[name]
    assert path.stat().st_size < 5_000_000
    agg = load_aggregator(name)
    feats, kpts = _features(64)
    g = torch.Generator().manual_seed(1)
    feats["aliked"] = torch.randn(64, 128, generator=g)  # the local source of promptmid-agg-v3
    for key, dim in agg.module.conf.sources.items():  # e.g. sd_up1 (PromptDM-small) of promptmid-agg-full-v1
        feats.setdefault(key, torch.randn(64, dim, generator=g))
    out = agg(feats, kpts, (200, 200))
    assert out.shape == (64, 256)
    assert torch.allclose(out.norm(dim=-1), torch.ones(64), atol=1e-4)
