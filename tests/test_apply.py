"""`promptmid apply`: a fitted result applied to other rasters reproduces registered_sar.tif exactly, on both
grids, as a COG, and refuses what it cannot do with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from promptmid import synth
from promptmid.cli import app
from tests.conftest import write_tif


def _run(*args: str):
    return CliRunner().invoke(app, list(args))


def _same_raster(a: Path, b: Path) -> None:
    with rasterio.open(a) as x, rasterio.open(b) as y:
        assert (x.crs, x.transform, x.nodata, x.dtypes, x.width, x.height) == \
            (y.crs, y.transform, y.nodata, y.dtypes, y.width, y.height)
        assert np.array_equal(x.read(), y.read())


@pytest.fixture(scope="module")
def match_run(tmp_path_factory) -> dict:
    """A georeferenced generated pair registered by `match` (xfeat, fast)."""
    root = tmp_path_factory.mktemp("apply_match")
    pair = synth.write_synthetic_geo_pair(root / "in", 320, seed=2, rotation_deg=0.5, shift_m=(40, -30), towns=False)
    out = root / "out"
    res = _run("match", str(pair["optical"]), str(pair["sar"]), "--out", str(out), "-p", "xfeat", "--no-figures",
               "--quiet")
    assert res.exit_code in (0, 6), res.output  # 6: --strict only; a transform is written either way
    return {"pair": pair, "out": out, "root": root}


def test_apply_reproduces_match_registered_sar(match_run: dict) -> None:
    out, pair = match_run["out"], match_run["pair"]
    applied = match_run["root"] / "applied.tif"
    res = _run("apply", str(out / "result.json"), str(pair["sar"]), "--out", str(applied), "--quiet")
    assert res.exit_code == 0, res.output
    _same_raster(applied, out / "registered_sar.tif")
    grids = json.loads((out / "result.json").read_text())["grids"]
    with rasterio.open(pair["optical"]) as o:
        assert grids["optical"]["width"] == o.width and rasterio.crs.CRS.from_user_input(grids["optical"]["crs"]) == o.crs


def test_apply_other_bands_both_ways_and_cog(match_run: dict, tmp_path: Path) -> None:
    """A mask on the SAR grid goes to the optical grid; a mask on the optical grid goes to the SAR grid (inverse),
    and the round trip lands back where it started (inside the overlap); --cog writes a COG."""
    out, pair = match_run["out"], match_run["pair"]
    with rasterio.open(pair["sar"]) as s:
        prof, (h, w) = s.profile, s.shape
    mask = np.zeros((h, w), np.uint8)
    mask[100:200, 120:220] = 200
    sar_mask = write_tif(tmp_path / "sar_mask.tif", mask, crs=prof["crs"], transform=prof["transform"])
    on_opt = tmp_path / "on_optical.tif"
    assert _run("apply", str(out / "result.json"), str(sar_mask), "--out", str(on_opt), "--cog", "-q").exit_code == 0
    with rasterio.open(on_opt) as d:
        assert d.driver == "GTiff" and d.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    back = tmp_path / "back_on_sar.tif"
    res = _run("apply", str(out / "result.json"), str(on_opt), "--out", str(back), "--from", "optical", "-q")
    assert res.exit_code == 0, res.output
    with rasterio.open(back) as d:
        assert d.shape == (h, w) and d.crs == prof["crs"] and d.transform == prof["transform"]
        assert np.abs(d.read(1)[110:190, 130:210].astype(int) - 200).max() <= 2


def test_apply_refuses_clearly(match_run: dict, tmp_path: Path) -> None:
    out, pair = match_run["out"], match_run["pair"]
    target = tmp_path / "x.tif"
    target.write_bytes(b"user file")
    res = _run("apply", str(out / "result.json"), str(pair["sar"]), "--out", str(target))
    assert res.exit_code == 3 and "--overwrite" in res.stderr and target.read_bytes() == b"user file"
    odd = write_tif(tmp_path / "odd.tif", np.ones((50, 70), np.uint8))
    res = _run("apply", str(out / "result.json"), str(odd), "--out", str(tmp_path / "y.tif"))
    assert res.exit_code == 2 and "neither grid" in res.stderr and "Traceback" not in res.output
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps({"status": "failed", "reason": "too few inliers", "transform": None}))
    res = _run("apply", str(failed), str(pair["sar"]), "--out", str(tmp_path / "z.tif"))
    assert res.exit_code == 2 and "no fitted transform" in res.stderr
    assert not (tmp_path / "y.tif").exists() and not (tmp_path / "z.tif").exists()
    # --out is never the result file or the raster, even with --overwrite (the fit would be lost)
    before = (out / "result.json").read_bytes()
    for target in (out / "result.json", pair["sar"]):
        res = _run("apply", str(out / "result.json"), str(pair["sar"]), "--out", str(target), "--overwrite")
        assert res.exit_code == 3 and "is an input" in res.stderr, res.output
    assert (out / "result.json").read_bytes() == before


@pytest.fixture(scope="module")
def scene_run(tmp_path_factory) -> dict:
    """A georeferenced generated pair registered by `scene` (xfeat, one tile)."""
    root = tmp_path_factory.mktemp("apply_scene")
    pair = synth.write_synthetic_geo_pair(root / "in", 384, seed=1, rotation_deg=0.5, shift_m=(40, -30), towns=False)
    out = root / "scene"
    res = _run("scene", str(pair["optical"]), str(pair["sar"]), "--out", str(out), "-p", "xfeat", "--tile", "512",
               "--search-radius", "150m", "--no-figures", "--quiet")
    assert res.exit_code == 0, res.output
    return {"pair": pair, "out": out}


def test_apply_reproduces_scene_registered_sar(scene_run: dict, tmp_path: Path) -> None:
    pair, out = scene_run["pair"], scene_run["out"]
    applied = tmp_path / "applied.tif"
    res = _run("apply", str(out / "result.json"), str(pair["sar"]), "--out", str(applied), "-q")
    assert res.exit_code == 0, res.output
    _same_raster(applied, out / "registered_sar.tif")
    _check_record(out / "result.json", "scene", pair)


def _check_record(path: Path, kind: str, pair: dict) -> None:
    """result.json carries the shared Fit record; read back it gives the same fit and the files' grids."""
    from promptmid.fit import read_fit
    from promptmid.geo import Grid
    from promptmid.io import read_raster

    data = json.loads(path.read_text())
    assert {"kind", "status", "confidence", "reason", "transform", "global_model", "grids"} <= set(data)
    fit = read_fit(path)
    assert fit.kind == kind == data["kind"] and fit.status == data["status"]
    assert np.allclose(fit.matrix, data["transform"])
    assert fit.optical == Grid.of(read_raster(pair["optical"]))
    assert fit.sar.size == Grid.of(read_raster(pair["sar"])).size
    assert fit.to_dict() == {k: data[k] for k in fit.to_dict()}


def test_match_result_carries_the_fit_record(match_run: dict) -> None:
    _check_record(match_run["out"] / "result.json", "match", match_run["pair"])


@pytest.mark.parametrize("bad", [[[0, 0, 0], [0, 0, 0], [0, 0, 1]], [[1, 0, 0], [0, 1, 0]],
                                 [[float("nan"), 0, 0], [0, 1, 0], [0, 0, 1]], [[1e300, 0, 0], [0, 1e300, 0], [0, 0, 1]],
                                 [[1, 0, 0], [0, 1, 0], [0, 0, 0]], [[1, 2, 0], [2, 4, 0], [0, 0, 1]], "text"])
def test_apply_refuses_an_unusable_transform(match_run: dict, tmp_path: Path, bad) -> None:
    data = json.loads((match_run["out"] / "result.json").read_text())
    data["transform"] = bad
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    res = _run("apply", str(broken), str(match_run["pair"]["sar"]), "--out", str(tmp_path / "o.tif"))
    assert res.exit_code == 2 and "broken.json" in res.stderr and "'transform'" in res.stderr, res.output
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize("edit, key", [
    (lambda d: d["grids"]["optical"].update(width=-5), "grids.optical"),
    (lambda d: d["grids"]["sar"].pop("height"), "grids.sar"),
    (lambda d: d["grids"]["optical"].update(width="wide"), "grids.optical"),
    (lambda d: d["grids"]["optical"].update(width=200000, height=200000), "memory"),
    (lambda d: d["grids"]["sar"].update(transform=[1, "a", 0, 0, 0, 1]), "grids.sar"),
    (lambda d: d["grids"]["optical"].update(crs="not a crs at all"), "grids.optical"),
    (lambda d: d.update(grids=[1, 2]), "grids"),
    (lambda d: d["grids"].pop("sar"), "grids.sar"),
])
def test_apply_refuses_a_malformed_match_record(match_run: dict, tmp_path: Path, edit, key: str) -> None:
    """A damaged record: exit 2, one line naming the file and the key (or the size), nothing written, and never a
    huge allocation."""
    data = json.loads((match_run["out"] / "result.json").read_text())
    edit(data)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    res = _run("apply", str(broken), str(match_run["pair"]["sar"]), "--out", str(tmp_path / "o.tif"))
    assert res.exit_code == 2, res.output
    assert key in res.stderr and (key == "memory" or "broken.json" in res.stderr), res.stderr
    assert not (tmp_path / "o.tif").exists()


@pytest.mark.parametrize("edit", [
    lambda d: d["global_model"].update(kind="spline"),
    lambda d: d["global_model"].update(coeffs_x=[1, 2]),
    lambda d: d["global_model"].update(coeffs_y=["a", 0, 1]),
    lambda d: d["global_model"]["normalisation"].update(scale=0),
    lambda d: d["global_model"].pop("normalisation"),
])
def test_apply_refuses_a_malformed_scene_model(scene_run: dict, tmp_path: Path, edit) -> None:
    pair = scene_run["pair"]
    data = json.loads((scene_run["out"] / "result.json").read_text())
    edit(data)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    res = _run("apply", str(broken), str(pair["sar"]), "--out", str(tmp_path / "o.tif"))
    assert res.exit_code == 2 and "broken.json" in res.stderr and "'global_model'" in res.stderr, res.output
