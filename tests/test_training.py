"""Aggregator training on a small generated set (xfeat features only, so it stays fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from promptmid.config import get_config
from promptmid.synth import make_pair
from promptmid.training.data import (
    FeatureCache, best_rotation_step, build_cache, gt_correspondences, make_view, read_manifest, split_of,
    working_gt,
)
from promptmid.training.losses import dual_softmax_loss, matching_accuracy
from promptmid.training.train import TrainConfig, pair_step, train


@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from promptmid.demo import write_demo_inputs

    root = tmp_path_factory.mktemp("synth")
    lines = []
    for seed in range(5):
        pair = make_pair(160, seed)
        opt, sar = write_demo_inputs(root / f"p{seed}", pair.optical, pair.sar)
        lines.append(json.dumps({"id": f"syn/p{seed}", "optical": str(opt.relative_to(root)),
                                 "sar": str(sar.relative_to(root)), "H": pair.H.tolist(), "source": "syn"}))
    (root / "synth.jsonl").write_text("\n".join(lines) + "\n")
    return root / "synth.jsonl"


@pytest.fixture(scope="module")
def cached(synth_manifest: Path, tmp_path_factory: pytest.TempPathFactory):
    recs = read_manifest(synth_manifest)
    cache = FeatureCache(get_config("xfeat"), tmp_path_factory.mktemp("cache"))
    return build_cache(cache, recs[:4], "train", views=2, progress=False), build_cache(
        cache, recs[4:], "eval", rotations=(0.0,), progress=False)


def test_gt_correspondences_and_loss():
    kp0 = torch.tensor([[10.0, 10.0], [50.0, 50.0], [90.0, 20.0]])
    H = torch.tensor([[1.0, 0, 5], [0, 1, -3], [0, 0, 1]], dtype=torch.float64)
    kp1 = torch.tensor([[15.5, 7.0], [55.0, 47.0], [200.0, 200.0]])
    pairs, dist = gt_correspondences(kp0, kp1, H, 3.0)
    assert pairs.tolist() == [[0, 0], [1, 1]]
    d = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert matching_accuracy(d, d, pairs) == 1.0
    assert dual_softmax_loss(d, d, pairs, dist) >= 0


def test_split_follows_readme():
    from promptmid.evaluation.manifest import Pair

    def rec(i, s="srif"):
        return Pair(i, Path("a"), Path("b"), s, np.eye(3))

    assert split_of(rec("srif/pair5")) == "train" and split_of(rec("srif/pair169")) is None
    assert split_of(rec("srif/pair190")) == "val"
    assert split_of(rec("3mos/GF3_city_1", "3mos")) == "train" and split_of(rec("3mos/SEN_city_1", "3mos")) == "test"
    assert split_of(rec("msg/p8", "msg")) == "test" and split_of(rec("rift2/x", "rift2")) == "near"


def test_views_keep_the_ground_truth(synth_manifest: Path):
    from promptmid.io import load_image

    rec = read_manifest(synth_manifest)[0]
    opt, sar = load_image(rec.optical, "optical"), load_image(rec.sar, "sar")
    H = working_gt(rec.H, opt, sar)
    assert best_rotation_step(sar, H) == 0.0
    view, Hv = make_view(sar, H, np.random.default_rng(0))
    # a bright optical-independent check: the valid mask maps to where the GT says
    ys, xs = np.nonzero(opt.valid[::8, ::8])
    pts = np.stack([xs * 8, ys * 8, np.ones_like(xs)], 1).astype(float) @ Hv.T
    pts = pts[:, :2] / pts[:, 2:]
    inside = (pts[:, 0] >= 0) & (pts[:, 1] >= 0) & (pts[:, 0] < view.image.shape[1]) & (pts[:, 1] < view.image.shape[0])
    assert inside.mean() > 0.3


def test_short_training_lowers_loss_and_raises_accuracy(cached, tmp_path: Path):
    train_entries, val_entries = cached
    small = {"dim": 64, "heads": 2, "global_tokens": 64}
    cfg = TrainConfig(epochs=6, lr=3e-3, batch_pairs=1, max_keypoints=300, patience=20, xy_jitter=0.0,
                      model=small)

    def acc_loss(model):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            res = [pair_step(model, e, cfg, gen, train=False) for e in train_entries]
        return float(np.mean([r[1] for r in res])), float(np.mean([float(r[0]) for r in res]))

    from promptmid.models.aggregation import PromptMIDAggregator, load_aggregator_file

    torch.manual_seed(cfg.seed)
    acc0, loss0 = acc_loss(PromptMIDAggregator(sources={"xfeat": 64}, **small).eval())
    summary = train(train_entries, val_entries, cfg, tmp_path / "run", progress=False)
    model, meta = load_aggregator_file(tmp_path / "run" / "best.safetensors")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    model.load_state_dict(last["model"])
    acc1, loss1 = acc_loss(model.eval())
    assert loss1 < loss0 and acc1 > acc0, (loss0, loss1, acc0, acc1)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == summary["epochs_run"] == 6 and rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "run" / "curves.png").is_file() and meta["config"]["sources"] == {"xfeat": 64}


def test_cli_train_and_resume(synth_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from promptmid.cli import app

    monkeypatch.setenv("PROMPTMID_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["train", str(synth_manifest), "--out", str(out), "--preset", "xfeat", "--seed", "3", "--quiet"]
    r = CliRunner().invoke(app, args + ["--epochs", "1", "--val-fraction", "0.3"])
    assert r.exit_code == 0, r.output
    assert (out / "best.safetensors").is_file() and (out / "best.safetensors.json").is_file()
    r = CliRunner().invoke(app, args + ["--epochs", "1"])
    assert r.exit_code != 0 and "--overwrite" in r.output
    r = CliRunner().invoke(app, args + ["--epochs", "2", "--val-fraction", "0.3", "--resume"])
    assert r.exit_code == 0, r.output
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


class _Foreign:  # an object another program might pickle into its checkpoint
    pass


@pytest.mark.parametrize("content", ["object", "keys", "garbage"])
def test_resume_refuses_a_foreign_checkpoint(synth_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             content: str):
    """--resume with a file that is not our checkpoint: exit 2 naming it, never PyTorch's weights_only advice."""
    from typer.testing import CliRunner

    from promptmid.cli import app

    monkeypatch.setenv("PROMPTMID_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    last = out / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    if content == "object":
        torch.save({"model": _Foreign()}, last)
    elif content == "keys":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, last)
    else:
        last.write_bytes(b"not a checkpoint at all")
    args = ["train", str(synth_manifest), "--out", str(out), "--preset", "xfeat", "--seed", "3", "--quiet",
            "--epochs", "1", "--val-fraction", "0.3", "--resume"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert "is not a promptmid checkpoint" in r.output and "weights_only" not in r.output


def test_train_overwrite_keeps_files_it_did_not_write(synth_manifest: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from promptmid.cli import app

    monkeypatch.setenv("PROMPTMID_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"1")
    args = ["train", str(synth_manifest), "--out", str(out), "--preset", "xfeat", "--quiet", "--epochs", "1",
            "--val-fraction", "0.3"]
    assert CliRunner().invoke(app, args).exit_code == 0
    # a missing manifest fails before anything in OUT is touched
    bad = CliRunner().invoke(app, ["train", str(tmp_path / "nope.jsonl"), "--out", str(out), "--overwrite", "-q"])
    assert bad.exit_code != 0 and (out / "best.safetensors").is_file()
    r = CliRunner().invoke(app, args + ["--overwrite"])
    assert r.exit_code == 0, r.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.bin").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # the old run's log was replaced, not extended


class _Planted:
    """Pickles to a call that writes a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_a_planted_cache_file_is_never_executed(tmp_path: Path):
    from promptmid.training.data import load_cached

    marker = tmp_path / "marker"
    path = tmp_path / "entry.pt"
    torch.save({"payload": _Planted(marker)}, path)
    assert load_cached(path) is None  # refused (weights_only) and rebuilt by the caller
    assert not marker.exists()


def test_training_validation_gives_what_the_matcher_gives(synth_manifest: Path, tmp_path: Path) -> None:
    """The validation inside training (cached features, the same aggregator, match_and_fit) registers a pair as
    Matcher.match does with the same settings (keypoint fit: no area search, no refinement): same inliers within
    5 % (the cache stores features in float16) and the same transform within 0.5 px."""
    from promptmid.api import Matcher
    from promptmid.evaluation.metrics import mean_corner_error
    from promptmid.training.train import evaluate_entry

    rec = read_manifest(synth_manifest)[1]  # a pair whose keypoint fit succeeds (seed 0 at 160 px: 5 inliers with
    # DINOv2 at lite's 392 px, 14 at 518 px)
    matcher = Matcher("lite", {"search": {"enabled": False}, "refine": {"enabled": False}})
    entry = FeatureCache(matcher.conf, tmp_path / "cache").eval_pair(rec, rotations=(0.0,))
    agg = matcher.describer.aggregator
    row = evaluate_entry(lambda feats, kp, size: agg(feats, kp, size), entry, matcher.conf["matching"],
                         matcher.conf["geometry"])
    result = matcher.match(rec.optical, rec.sar)
    fit = next(h["transform"] for h in result.hypotheses if h["source"] == "keypoints")  # before the QC's verdict
    err = mean_corner_error(np.asarray(fit), rec.H, entry["optical_size"])
    assert row["ok"]
    assert abs(row["inliers"] - result.num_inliers) <= 0.05 * result.num_inliers + 1, (row["inliers"], result.num_inliers)
    assert abs(row["corner_error"] - err) < 0.5, (row["corner_error"], err)
