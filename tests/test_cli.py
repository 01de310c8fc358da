"""The command line: products, --json, --overwrite, and one clear line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from promptmid.cli import app
from promptmid.demo import write_demo_inputs
from tests.conftest import write_tif

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory, demo_pair):
    return write_demo_inputs(tmp_path_factory.mktemp("inputs"), demo_pair.optical, demo_pair.sar)


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_match_writes_all_products(tmp_path, demo_files, demo_pair):
    out = tmp_path / "out"
    res = _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(out), "--preset", "xfeat", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["status"] == "ok" and len(data["transform"]) == 3
    assert {p.name for p in out.iterdir()} >= {"result.json", "tiepoints.csv", "matches.png", "checkerboard.png",
                                                "registered_sar.tif"}
    rows = (out / "tiepoints.csv").read_text().splitlines()
    assert rows[0].startswith("optical_x,optical_y,sar_x,sar_y") and len(rows) == data["matches"] + 1
    import rasterio

    with rasterio.open(out / "registered_sar.tif") as src:
        assert (src.width, src.height) == (512, 512) and src.dtypes[0] == "float32"
    import cv2

    figure = cv2.imread(str(out / "matches.png"))  # both images side by side under a header, enlarged to 1200 px
    assert figure.shape[1] >= 1200 and figure.shape[0] > 1200 * 512 / (2 * 512 + 16)


def test_the_console_entry_point_ends_with_every_product_written(tmp_path, demo_files):
    """``main`` ends the process without the interpreter's teardown: the exit code, the JSON on stdout, an error on
    stderr and every product (complete, readable) must still be there."""
    import rasterio

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "promptmid.cli", "match", str(demo_files[0]), str(demo_files[1]), "--out", str(out),
           "--preset", "xfeat", "--json", "--threads", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout) == json.loads((out / "result.json").read_text())
    with rasterio.open(out / "registered_sar.tif") as src:
        assert np.isfinite(src.read(1)).any()
    assert (out / "report.html").read_text().rstrip().endswith("</html>")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # products exist: refused, exit 3
    assert again.returncode == 3 and "--overwrite" in again.stderr
    missing = subprocess.run([sys.executable, "-m", "promptmid.cli", "match", str(tmp_path / "none.tif"),
                              str(demo_files[1]), "--out", str(tmp_path / "o2")], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "none.tif" in missing.stderr


def test_existing_output_needs_overwrite(tmp_path, demo_files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    res = _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(out), "--preset", "xfeat", "-q")
    assert res.exit_code == 3 and "--overwrite" in res.stderr and "Traceback" not in res.output
    assert (out / "keep.txt").read_text() == "user file"


@pytest.mark.parametrize(
    "kind, code, message",
    [
        ("missing", 2, "No image at path"),
        ("empty", 2, "empty file"),
        ("bands", 2, "bands"),
        ("nan", 2, "NaN"),
        ("constant", 2, "constant"),
        ("nodata", 2, "no valid pixel"),
        ("small", 2, "at least"),
    ],
)
def test_bad_sar_input_gives_one_clear_line(tmp_path, demo_files, kind, code, message):
    sar = tmp_path / f"{kind}.tif"
    rng = np.random.default_rng(0)
    if kind == "empty":
        sar.write_bytes(b"")
    elif kind == "bands":
        write_tif(sar, rng.random((64, 64, 6)).astype(np.float32))
    elif kind == "nan":
        write_tif(sar, np.full((64, 64), np.nan, np.float32))
    elif kind == "constant":
        write_tif(sar, np.zeros((64, 64), np.uint16) + 5)
    elif kind == "nodata":
        write_tif(sar, np.zeros((64, 64), np.float32), nodata=0)
    elif kind == "small":
        write_tif(sar, rng.random((20, 20)).astype(np.float32))
    out = tmp_path / "out"
    res = _run("match", str(demo_files[0]), str(sar), "--out", str(out), "-p", "xfeat")
    assert res.exit_code == code, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) <= 2  # one message (rich may wrap a long line)
    assert not out.exists()  # nothing is created for unusable input


def test_too_few_matches_writes_failed_result(tmp_path):
    rng = np.random.default_rng(1)
    a = write_tif(tmp_path / "a.tif", rng.random((96, 96)).astype(np.float32))
    b = write_tif(tmp_path / "b.tif", rng.random((96, 96)).astype(np.float32))
    out = tmp_path / "out"
    # keypoints only: with the area search a noise pair ends "uncertain" (never ok; tests/test_search.py)
    res = _run("match", str(a), str(b), "--out", str(out), "-p", "xfeat", "--min-inliers", "500", "--no-search", "-q")
    assert res.exit_code == 5 and "registration failed" in res.stderr
    data = json.loads((out / "result.json").read_text())
    assert data["status"] == "failed" and data["transform"] is None and data["reason"]
    assert not (out / "registered_sar.tif").exists()


def test_a_result_that_is_not_ok_suggests_trying_rotations(tmp_path):
    from promptmid.cli import rotation_tip
    from promptmid.config import get_config

    rng = np.random.default_rng(1)
    a = write_tif(tmp_path / "a.tif", rng.random((96, 96)).astype(np.float32))
    b = write_tif(tmp_path / "b.tif", rng.random((96, 96)).astype(np.float32))
    args = ["match", str(a), str(b), "-p", "xfeat", "--min-inliers", "500", "--no-search"]
    res = _run(*args, "--out", str(tmp_path / "o1"))
    assert res.exit_code == 5 and "--try-rotations" in res.stderr and "as oriented" in res.stderr
    res = _run(*args, "--out", str(tmp_path / "o2"), "--try-rotations")  # every rotation tried: no advice
    assert res.exit_code == 5 and "--try-rotations" not in res.stderr
    conf = get_config("lite")
    assert "+-15 deg" in rotation_tip("uncertain", conf) and rotation_tip("ok", conf) is None
    assert rotation_tip("failed", {**conf, "search": {**conf["search"], "rotation_range": 180.0}}) is None


def test_unknown_preset_is_a_clear_error(tmp_path, demo_files):
    res = _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(tmp_path / "o"), "-p", "nope")
    assert res.exit_code == 2 and "Unknown preset" in res.stderr


def test_models_lists_every_model():
    res = _run("models", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    names = {r["name"] for r in rows}
    assert {"xfeat", "dinov2_vits14", "dinov2 graph (ONNX Runtime)", "promptmid-search-head-v1", "promptmid-pick-v1",
            "promptmid-qc-v3", "promptmid-agg-v3", "promptdm-small"} <= names and all(r["ready"] for r in rows)


@pytest.mark.parametrize("args, module", [(["models", "--json", "--no-verify"], "promptmid.models.status"),
                                          (["eval-methods"], "promptmid.evaluation.methods")])
def test_listing_commands_do_not_import_torch(args, module):
    """Listing the models or the evaluation methods answers fast: no torch import (python -X importtime names every
    module imported)."""
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "promptmid.cli", *args],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert module in imported and "torch" not in imported


def test_shipped_file_row_checks_the_pinned_checksum(tmp_path):
    from promptmid.models.status import shipped_file_row
    from promptmid.models.weights import SEARCH_HEAD, SEARCH_HEAD_SHA256

    assert shipped_file_row(SEARCH_HEAD, SEARCH_HEAD_SHA256, True, "m")[0]["ready"]
    changed = tmp_path / "head.json"
    changed.write_bytes(SEARCH_HEAD.read_bytes() + b" ")
    [row] = shipped_file_row(changed, SEARCH_HEAD_SHA256, True, "m")
    assert not row["ready"] and "sha256" in row["message"]
    assert shipped_file_row(changed, SEARCH_HEAD_SHA256, False, "m")[0]["ready"]  # --no-verify: presence only
    [row] = shipped_file_row(tmp_path / "gone.json", SEARCH_HEAD_SHA256, True, "m")
    assert not row["ready"] and "missing" in row["message"]


def test_models_reports_the_dinov2_graph_cache(tmp_path):
    """The ONNX Runtime graph cache: not built yet in an empty folder, rebuilt when its file does not match."""
    from promptmid.models.dinov2_onnx import graph_status

    row = graph_status(cache=tmp_path)
    assert row["ready"] and "not built yet" in row["message"] and row["cache_path"].startswith(str(tmp_path))
    path = Path(row["cache_path"])
    path.write_bytes(b"not a graph")
    path.with_suffix(".json").write_text(json.dumps({"sha256": "0" * 64}))
    assert "stale or corrupt" in graph_status(cache=tmp_path)["message"]


def test_demo_command(tmp_path):
    res = _run("demo", "--out", str(tmp_path / "demo"), "--preset", "xfeat")
    assert "true transform" in res.stdout
    assert (tmp_path / "demo" / "demo_truth.json").is_file()


def test_match_with_diffusion_features_from_a_local_model(tmp_path, demo_files):
    """--dm switches lite to full: the tiny random SD model is loaded from disk like a user's model."""
    from tests.diffusion_fixtures import make_tiny_sd

    sd = make_tiny_sd(tmp_path / "sd")
    out = tmp_path / "out"
    args = ("match", str(demo_files[0]), str(demo_files[1]), "--out", str(out), "--dm", str(sd),
            "--land-use", "water", "--dm-ensemble", "1", "--no-figures", "-q")
    refused = _run(*args)  # full's shipped aggregator was trained on PromptDM-small features, not on this model's
    assert refused.exit_code == 2 and "aggregator trained with its features" in refused.stderr
    assert not out.exists()
    res = _run(*args, "--aggregator", "none")
    assert res.exit_code in (0, 5), res.output  # random SD weights: registering is not the point here
    data = json.loads((out / "result.json").read_text())
    assert data["config"]["preset"] == "full"
    # the prompt of each image of the pair, from the pair's context (not whichever image came last)
    assert data["pair_context"]["prompts"] == {"optical": "an optical satellite image of water",
                                               "sar": "a SAR satellite image of water"}
    assert data["timings"]["diffusion"] > 0


def test_missing_diffusion_model_is_a_clear_error(tmp_path, demo_files):
    res = _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(tmp_path / "o"), "-p", "full",
               "--dm", str(tmp_path / "no_sd"), "--aggregator", "none")
    assert res.exit_code == 4 and "not found" in res.stderr


def test_cli_options_map_onto_config_overrides():
    from promptmid.commands.common import build_overrides, resolve_preset
    from promptmid.config import CONCAT

    o = build_overrides(model="homography", try_rotations=True, rotation_step=45, aggregator="none", dm="sd21",
                        dm_lora="lora", land_use="water", dm_ensemble=2)
    assert o["geometry"] == {"model": "homography", "rotations": [0.0, 45.0, 90.0, 135.0, 180.0, 225.0, 270.0, 315.0]}
    assert o["aggregator"] == CONCAT
    dm = o["sources"]["diffusion"]
    assert {k: dm[k] for k in ("model", "lora", "land_use", "ensemble")} == {"model": "sd21", "lora": "lora",
                                                                           "land_use": "water", "ensemble": 2}
    assert resolve_preset("lite", "sd21", "none") == "full" and resolve_preset("xfeat", None) == "xfeat"


@pytest.mark.parametrize("option", [["--top-k", "-5"], ["--top-k", "0"], ["--threshold", "-3"], ["--threshold", "0"],
                                    ["--max-side", "1"], ["--min-inliers", "0"], ["--threads", "-1"],
                                    ["--try-rotations", "--rotation-step", "0"],
                                    ["--try-rotations", "--rotation-step", "200"],
                                    ["--search-scale", "1.2,0.8"], ["--search-scale", "0,1"],
                                    ["--search-scale", "abc"], ["--search-rotation", "-1"],
                                    ["--search-rotation", "270"], ["--threshold", "nan"], ["--threshold", "inf"],
                                    ["--search-rotation", "nan"]])
def test_numeric_options_are_checked_up_front(tmp_path, demo_files, option):
    out = tmp_path / "o"
    res = _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(out), *option, "-q")
    assert res.exit_code == 2, res.output
    assert "must be" in res.stderr and not out.exists()  # refused before anything was written


def test_overwrite_removes_our_stale_products_and_never_an_input(tmp_path, demo_files):
    out = tmp_path / "out"
    assert _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(out), "-p", "xfeat", "-q").exit_code == 0
    assert (out / "registered_sar.tif").is_file() and (out / "matches.png").is_file()
    (out / "mine.txt").write_text("keep")
    # the same output folder, now a pair that fails: the old pair's products must not stay beside it
    flat = tmp_path / "flat.png"
    import cv2

    cv2.imwrite(str(flat), (np.random.default_rng(0).random((200, 200)) * 4).astype(np.uint8) + 100)
    res = _run("match", str(flat), str(demo_files[1]), "--out", str(out), "-p", "xfeat", "--overwrite", "-q")
    assert res.exit_code == 5, res.output
    assert not (out / "registered_sar.tif").exists() and not (out / "matches.png").exists()
    assert json.loads((out / "result.json").read_text())["status"] == "failed"
    assert (out / "mine.txt").read_text() == "keep"
    # an input that sits in --out under a product's name is refused, untouched
    victim = out / "checkerboard.png"
    victim.write_bytes(Path(demo_files[0]).read_bytes())
    before = victim.read_bytes()
    res = _run("match", str(victim), str(demo_files[1]), "--out", str(out), "--overwrite", "-q")
    assert res.exit_code == 3 and "would be overwritten" in res.stderr
    assert victim.read_bytes() == before


def test_int8_and_complex_sar_write_complete_products(tmp_path, demo_files, demo_pair):
    """SAR dtypes OpenCV cannot warp (int8) and complex SLC still give every product; result.json says what was
    done to a complex input."""
    import rasterio

    amp = demo_pair.sar / demo_pair.sar.max()
    cases = {"int8": (1 + amp * 120).astype(np.int8),
             "complex64": (amp * np.exp(1j * np.random.default_rng(0).uniform(0, 6.28, amp.shape))).astype(np.complex64)}
    for name, data in cases.items():
        sar = write_tif(tmp_path / f"sar_{name}.tif", data)
        out = tmp_path / f"out_{name}"
        res = _run("match", str(demo_files[0]), str(sar), "--out", str(out), "-p", "xfeat", "-q")
        assert res.exit_code == 0, (name, res.output)
        assert {p.name for p in out.iterdir()} >= {"result.json", "tiepoints.csv", "registered_sar.tif"}
        assert not [p for p in out.iterdir() if p.name.startswith(".promptmid")]  # no staging left behind
        with rasterio.open(out / "registered_sar.tif") as ds:
            assert ds.dtypes[0] == ("int8" if name == "int8" else "float32")
        notes = json.loads((out / "result.json").read_text())["input_notes"]
        assert bool(notes) == (name == "complex64")


def test_unwritable_output_is_refused_before_any_work(tmp_path, demo_files):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(blocker / "out"), "-q")
    assert res.exit_code == 3 and "not writable" in res.stderr


def test_a_killed_runs_staging_folder_neither_blocks_nor_stays(tmp_path, demo_files):
    out = tmp_path / "out"
    (out / ".promptmid-products-abc123").mkdir(parents=True)  # what a run killed while staging leaves
    (out / ".promptmid-products-abc123" / "result.json").write_text("{}")
    res = _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(out), "-p", "xfeat", "--no-search", "-q")
    assert res.exit_code == 0, res.output
    assert (out / ".promptmid-products-abc123").exists()  # not ours to remove without --overwrite
    res = _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(out), "-p", "xfeat", "--no-search", "-q",
               "--overwrite")
    assert res.exit_code == 0 and not (out / ".promptmid-products-abc123").exists()
    (out / "mine.txt").write_text("keep")
    res = _run("match", str(demo_files[0]), str(demo_files[1]), "--out", str(out), "-p", "xfeat", "-q")
    assert res.exit_code == 3  # a user's file still makes the folder non-empty


def test_search_features_option_maps_onto_the_config_and_refuses_unknown_names():
    from promptmid.commands.common import search_overrides
    from promptmid.errors import InputError

    assert search_overrides({"search_features": "aliked"}) == {"search": {"learned": "aliked"}}
    assert search_overrides({"search_features": "gradients"}) == {"search": {"learned": None}}
    assert search_overrides({"search_features": "both"}) == {"search": {"learned": "both"}}
    assert search_overrides({"always_search": True}) == {"search": {"skip_when_ok": False}}
    assert search_overrides({"always_search": False}) == {}
    with pytest.raises(InputError, match="--search-features"):
        search_overrides({"search_features": "sift"})
