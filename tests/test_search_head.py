"""The trained projection of ALIKED's dense map for the area search (promptmid.training.search_head,
promptmid.models.dense_features.load_search_head, search.learned = 'trained' / 'both-trained')."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from promptmid.errors import ModelError
from promptmid.evaluation.manifest import Pair
from promptmid.geometry import affine_about_centre
from promptmid.io import load_image
from promptmid.models import dense_features
from promptmid.models.dense_features import SearchFeatures, load_search_head, search_features
from promptmid.synth import make_pair
from promptmid.training import search_head


@pytest.fixture(scope="module")
def levels():
    """Two generated pairs reduced to the search's coarse level, the SAR warped back onto the optical by the truth."""
    features = SearchFeatures()
    out = []
    for seed in (3, 4):
        H = affine_about_centre((256, 256), 8.0, 1.1, 0.0, (12.0, -9.0))
        pair = make_pair(256, seed=seed, H=H)
        rec = Pair(id=f"synth/{seed}", optical=pair.optical, sar=pair.sar, source="synth", H=pair.H, points=None,
                   meta={}, where="test")
        item = search_head.pair_levels(rec, features, {"max_side": 1024})
        assert item is not None
        out.append(search_head.to_tensors(item))
    return out


def test_shipped_head_loads_checked_and_builds_the_channels():
    head = load_search_head()
    assert head.shape == (128, 16) and torch.isfinite(head).all()
    channels = search_features("trained")
    assert channels.name == "aliked-trained" and torch.equal(channels.projection, head)
    assert search_features("aliked").name == "aliked"
    with pytest.raises(ValueError, match="learned search channels"):
        search_features("sift")


def test_head_with_wrong_checksum_or_shape_is_refused(tmp_path, monkeypatch):
    data = json.loads(dense_features.SEARCH_HEAD.read_text())
    data["projection"][0][0] += 1.0
    changed = tmp_path / "head.json"
    changed.write_text(json.dumps(data))
    monkeypatch.setattr(dense_features, "SEARCH_HEAD", changed)
    load_search_head.cache_clear()
    try:
        with pytest.raises(ModelError, match="sha256"):
            load_search_head()
    finally:
        load_search_head.cache_clear()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"projection": [[1.0] * 16] * 100}))
    with pytest.raises(ModelError, match=r"\[128, C\]"):
        load_search_head(str(bad))
    assert load_search_head(str(changed)).shape == (128, 16)  # a user's file: not pinned


def _crop_peak(item: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Where an optical crop correlates best inside the SAR window 12 px larger on every side (``(12, 12)``: at its
    own position)."""
    crop = item["opt_grad"][:, 40:88, 30:78], item["opt_mask"][40:88, 30:78]
    ncc = search_head.masked_ncc(*crop, item["sar_grad"][:, 28:100, 18:90], item["sar_mask"][28:100, 18:90])
    assert ncc.shape == (25, 25)
    return divmod(int(ncc.argmax()), 25)


def test_levels_are_aligned_by_the_truth(levels):
    """The SAR level warped by the truth lies on the optical level: an optical crop correlates best with the SAR
    window at its own position."""
    for it in levels:
        assert it["opt_dense"].shape[0] == 128 and it["opt_grad"].shape[1:] == it["opt_mask"].shape
        assert _crop_peak(it) == (12, 12)


def test_pseudo_sar_keeps_nodata_and_synthetic_levels_are_aligned():
    """A pseudo-SAR made from an optical image is positive where the optical is valid and nodata elsewhere; its
    level lies on the optical level (identity truth, also when the optical image is downscaled)."""
    rng = np.random.default_rng(0)
    gray = make_pair(128, seed=5).optical.mean(-1)
    valid = np.ones_like(gray, bool)
    valid[:, :10] = False
    sar = search_head.pseudo_sar(gray, valid, rng)
    assert sar.shape == gray.shape and sar.dtype == np.float32
    assert (sar[valid] > 0).all() and (sar[~valid] == 0).all()
    features, io_conf = SearchFeatures(), {"max_side": 200}
    opt = load_image(make_pair(256, seed=6).optical, "optical", **io_conf)
    item = search_head.synthetic_levels(opt, search_head.optical_level(opt, features), features, io_conf, rng)
    iy, ix = _crop_peak(search_head.to_tensors(item))
    assert abs(iy - 12) <= 1 and abs(ix - 12) <= 1


def test_masked_ncc_peaks_at_a_crop_of_itself():
    f = torch.randn(4, 40, 40)
    mask = torch.ones(40, 40, dtype=torch.bool)
    ncc = search_head.masked_ncc(f[:, 10:30, 5:25], mask[10:30, 5:25], f, mask)
    assert ncc.shape == (21, 21) and divmod(int(ncc.argmax()), 21) == (10, 5)
    assert 0.97 < float(ncc[10, 5]) <= 1.0 + 1e-5  # the window's mean is removed, not the crop's (as the search)


def test_training_steps_run_and_change_the_projection(levels):
    model, history = search_head.train(levels, levels, steps=2, batch=2, every=1, lr=1e-2)
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    assert not torch.equal(model.optical.detach(), search_head.random_init())
    assert model.optical.shape == (128, 16)


def test_matcher_builds_the_trained_channels():
    from promptmid.api import Matcher

    gradients, trained = Matcher("lite").search_channels()  # the default: both searches, trained projection
    assert gradients is None and trained.name == "aliked-trained"
    (only,) = Matcher("lite", {"search": {"learned": "trained"}}).search_channels()
    assert only.name == "aliked-trained"
