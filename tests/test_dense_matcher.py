"""The coarse dense matcher: its head, matches, affine fit, weight checks and one training step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from promptmid.errors import ModelError
from promptmid.geometry import Size, apply_transform, corner_error
from promptmid.matching import fit_geometry
from promptmid.models.dense_matcher import (MIN_MATCHES, DenseMatcher, cell_centres, cell_validity, load_matcher,
                                            mutual_matches, save_matcher)
from promptmid.training.dense_matcher import cell_targets, evaluate, item_loss, train


def tiny() -> DenseMatcher:
    torch.manual_seed(0)
    return DenseMatcher(in_dim=16, dim=8, layers=1, heads=2)


def item(seed: int = 0, shift: tuple[float, float] = (20.0, -12.0)) -> dict:
    """Random tokens of a 6x6 optical grid over 96 px and an 8x8 SAR grid over 128 px, SAR = optical shifted."""
    g = torch.Generator().manual_seed(seed)
    H = np.array([[1.0, 0.0, shift[0]], [0.0, 1.0, shift[1]], [0.0, 0.0, 1.0]])
    return {"opt": torch.randn(1, 16, 6, 6, generator=g).half(), "sar": torch.randn(1, 16, 8, 8, generator=g).half(),
            "opt_valid": np.ones((6, 6), bool), "sar_valid": np.ones((8, 8), bool), "H": H,
            "opt_size": (96, 96), "sar_size": (128, 128), "id": f"tiny{seed}"}


def test_log_probabilities_shape_and_masked_cells_never_match() -> None:
    it = item()
    it["sar_valid"][:2] = False
    log_p = tiny()(it["opt"], it["sar"], torch.from_numpy(it["opt_valid"]), torch.from_numpy(it["sar_valid"]))
    assert log_p.shape == (36, 64)
    assert torch.isinf(log_p[:, :16]).all() and torch.isfinite(log_p[:, 16:]).all()
    _, i1, prob = mutual_matches(log_p, 0.0)
    assert (i1 >= 16).all() and ((prob > 0) & (prob <= 1)).all()


def test_mutual_matches_keeps_mutual_best_above_threshold() -> None:
    p = torch.full((3, 3), 0.01)
    p[0, 1], p[1, 0], p[2, 2] = 0.9, 0.5, 0.1
    p[2, 1] = 0.3  # optical 2's best is SAR 1, whose best is optical 0: not mutual
    i0, i1, prob = mutual_matches(p.log(), 0.2)
    assert list(zip(i0.tolist(), i1.tolist())) == [(0, 1), (1, 0)]
    np.testing.assert_allclose(prob, [0.9, 0.5], rtol=1e-5)


def test_cell_targets_follow_the_truth() -> None:
    idx0, idx1 = cell_targets(item(shift=(32.0, 16.0)))  # 16 px cells: 2 cells right, 1 down
    assert len(idx0) == 36
    r0, c0 = np.divmod(idx0.numpy(), 6)
    r1, c1 = np.divmod(idx1.numpy(), 8)
    assert (c1 == c0 + 2).all() and (r1 == r0 + 1).all()


def test_fit_affine_recovers_a_transform_from_cell_centres() -> None:
    truth = np.array([[0.95, -0.1, 14.0], [0.12, 1.02, -9.0], [0.0, 0.0, 1.0]])
    p0 = cell_centres((12, 12), (256, 256))
    rng = np.random.default_rng(0)
    p1 = apply_transform(truth, p0)
    p1[:20] += rng.uniform(40, 80, (20, 2))  # outliers
    fit = fit_geometry(p0, p1, "affine", 3.0, min_inliers=MIN_MATCHES)  # as the dense matcher fits
    M, inliers = fit.matrix, fit.inliers
    assert M is not None and inliers[20:].mean() > 0.95
    assert corner_error(M, truth, Size(256, 256)).max() < 0.5
    assert fit_geometry(p0[:5], p1[:5], "affine", 3.0, min_inliers=MIN_MATCHES).matrix is None  # too few matches


def test_cell_validity_is_half_valid_cells() -> None:
    valid = np.zeros((64, 64), bool)
    valid[:, :40] = True
    assert cell_validity(valid, (4, 4)).tolist() == [[True, True, True, False]] * 4


def test_one_training_step_and_evaluation_on_a_tiny_set() -> None:
    items = [item(s) for s in range(3)]
    before = item_loss(tiny(), items[0])
    model, history = train(items, items, steps=2, batch=2, every=1,
                           model_conf={"in_dim": 16, "dim": 8, "layers": 1, "heads": 2})
    assert len(history) == 2 and np.isfinite(history[-1]["loss"]) and before is not None
    scores = evaluate(model, items)
    assert scores["of"] == 3 and 0.0 <= scores["precision"] <= 1.0


def test_training_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    conf = {"in_dim": 16, "dim": 8, "layers": 1, "heads": 2}
    items = [item(s) for s in range(2)]
    train(items, items, steps=1, batch=1, every=1, model_conf=conf, checkpoint=tmp_path / "ck.pt")
    _, history = train(items, items, steps=2, batch=1, every=1, model_conf=conf, checkpoint=tmp_path / "ck.pt")
    assert [row["step"] for row in history] == [1, 2]


def test_weights_round_trip_and_are_checked(tmp_path: Path) -> None:
    model = tiny()
    path = tmp_path / "dense.safetensors"
    sha = save_matcher(model, path, {"note": "test"})
    loaded = load_matcher(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    meta = json.loads(Path(str(path) + ".json").read_text())
    assert meta["sha256"] == sha and meta["config"]["dim"] == 8

    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")  # damaged file
    with pytest.raises(ModelError, match="sha256"):
        load_matcher(path)

    save_matcher(tiny(), path, {})
    meta = json.loads(Path(str(path) + ".json").read_text())
    meta["config"]["dim"] = 16  # keys/shapes no longer fit the file
    Path(str(path) + ".json").write_text(json.dumps(meta))
    with pytest.raises(ModelError):
        load_matcher(path)
    with pytest.raises(ModelError, match="not found"):
        load_matcher(tmp_path / "missing.safetensors")


def test_backbone_cells_stack_dinov2_and_gradient_descriptors(demo_pair) -> None:
    from promptmid.io import load_image
    from promptmid.models.dense_matcher import GRADIENT_BINS, Backbone

    opt = load_image(demo_pair.optical, "optical")
    cells = Backbone()(opt)
    assert cells.shape == (1, 768 + 9 * GRADIENT_BINS ** 2, 16, 16)
    norms = cells[0, 768:].norm(dim=0)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-4, rtol=0)


def test_fit_hypothesis_maps_working_cells_to_original_px(demo_pair) -> None:
    from promptmid.io import load_image, rotate_prepared
    from promptmid.models.dense_matcher import fit_hypothesis
    from promptmid.training.data import working_gt

    opt = load_image(demo_pair.optical, "optical", max_side=256)  # working px != original px
    sar = load_image(demo_pair.sar, "sar", max_side=256)
    turned, to_sar = rotate_prepared(sar, 90.0)
    H = np.linalg.inv(to_sar) @ working_gt(demo_pair.H, opt, sar)  # optical working px -> turned SAR px
    p0 = cell_centres((16, 16), (256, 256))
    (hyp,) = fit_hypothesis(opt, sar, p0, apply_transform(to_sar, apply_transform(H, p0)), np.ones(len(p0)), 4.0)
    assert hyp.source == "dense" and 0.99 <= hyp.score <= 1.0
    assert corner_error(hyp.matrix, demo_pair.H, Size(512, 512)).max() < 0.5
    assert hyp.scale == pytest.approx(np.sqrt(abs(np.linalg.det(demo_pair.H[:2, :2]))), rel=1e-3)  # same footprint


def test_matcher_pools_a_dense_hypothesis_and_refuses_missing_weights(tmp_path: Path, demo_pair) -> None:
    from promptmid.api import Matcher

    path = tmp_path / "dense.safetensors"
    torch.manual_seed(0)
    save_matcher(DenseMatcher(dim=8, layers=1, heads=2), path, {})
    m = Matcher("xfeat", {"search": {"dense": str(path), "skip_when_ok": False}})
    result = m.match(demo_pair.optical, demo_pair.sar)
    assert result.transform is not None
    assert corner_error(np.asarray(result.transform), demo_pair.H, Size(512, 512)).mean() < 2.0
    with pytest.raises(ModelError, match="not found"):
        Matcher("xfeat", {"search": {"dense": str(tmp_path / "none.safetensors"), "skip_when_ok": False}}).match(
            demo_pair.optical, demo_pair.sar)
    with pytest.raises(ValueError, match="search.dense"):
        Matcher("xfeat", {"search": {"dense": True, "skip_when_ok": False}}).match(demo_pair.optical, demo_pair.sar)


def test_training_without_its_manifest_exits_2_with_a_message(tmp_path: Path, capsys) -> None:
    from promptmid.training.dense_matcher import main

    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "w.safetensors")]) == 2
    assert "all.jsonl not found" in capsys.readouterr().err
