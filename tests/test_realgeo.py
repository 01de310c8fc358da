"""Real georeferenced products through `scene`: BigEarthNet Sentinel-1/Sentinel-2 chips (4-band B02,B03,B04,B08
optical, VV/VH dB SAR) with injected georeferencing offsets, a 13-band stack, a NaN-bordered dB SAR, and the OS-SIFT
pair (EPSG:4326, the SAR ~74 m off). Skipped with a message when the shared data is absent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine
from typer.testing import CliRunner

from promptmid import scene
from promptmid.cli import app
from promptmid.geometry import translation
from tests.conftest import DATA_ROOT

GEO_ROOT = DATA_ROOT.parent / "geo"
OS_SIFT = DATA_ROOT / "os-sift"
OS_SIFT_OPTICAL = OS_SIFT / "18APR24174447-P2AS-013202438020_01_P001L1-1-L2.tiff"
OS_SIFT_SAR = OS_SIFT / "GF3_KAS_SL_015331_W95.9_N41.3_20190709_L1B_HH_L10004105495-1-L2.tiff"
OS_SIFT_H = np.array([[1.0, 0.0, 165.2], [0.0, 1.0, 132.5], [0.0, 0.0, 1.0]])  # manifests/os-sift.jsonl


@pytest.fixture(scope="module")
def ben_pairs() -> list[dict]:
    if not (GEO_ROOT / "pairs.jsonl").is_file():
        pytest.skip(f"BigEarthNet chips not found at {GEO_ROOT} (shared data; set PROMPTMID_DATA to optsar/)")
    return [json.loads(line) for line in (GEO_ROOT / "pairs.jsonl").read_text().splitlines() if line.strip()]


def _copy(src: Path, dst: Path, offset: tuple[float, float] = (0, 0), edit=None, **profile) -> Path:
    """Copy a GeoTIFF, shifting its geotransform by ``offset`` px (the README recipe), keeping band descriptions."""
    with rasterio.open(src) as ds:
        prof, data, desc = ds.profile, ds.read(), ds.descriptions
    prof["transform"] = prof["transform"] * Affine.translation(*offset)
    if edit is not None:
        data, desc = edit(data, desc)
    prof.update(count=len(data), dtype=str(data.dtype), **profile)
    with rasterio.open(dst, "w", **prof) as out:
        out.write(data)
        for i, d in enumerate(desc):
            if d:
                out.set_band_description(i + 1, d)
    return dst


def _corner_error(result: scene.SceneResult, truth: np.ndarray, size: int = 120) -> float:
    c = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], float)
    t = np.hstack([c, np.ones((4, 1))]) @ truth.T
    return float(np.abs(result.model.apply(c) - t[:, :2]).max())


OFFSET = (5.0, -3.0)  # px injected into the SAR geotransform


def test_bigearthnet_offsets_recovered_through_scene(tmp_path: Path, ben_pairs: list[dict], matcher_lite) -> None:
    """For every pair: the geo prior carries the injected offset exactly, and the scene correction undoes it: the
    fit (optical px -> SAR file px, which the offset does not change) with the offset equals the fit without it
    within 1 px, and both are within 2 px of the identity (BigEarthNet's own S1/S2 co-registration is good to
    ~1-2 px: the six pairs' fits without any offset are 0.3-2 px from it)."""
    root = GEO_ROOT
    opts = scene.SceneOptions(figures=False)
    for p in ben_pairs:
        name = p["id"].replace("/", "_")
        fits = {}
        for offset in ((0.0, 0.0), OFFSET):
            sar = _copy(root / p["sar"], tmp_path / f"{name}_{offset[0]:g}.tif", offset)
            r = scene.estimate_scene(root / p["optical"], sar, matcher_lite, opts)
            assert r.has_transform, (p["id"], r.reason)
            # the scene verdict follows its agreeing tiles' QC (a chip fitted by the area shift alone is uncertain)
            assert r.ok == any(t.verdict == "ok" for t in r.tiles if t.agrees) and r.status != "failed"
            assert r.prior_kind == "geo" and np.allclose(r.prior, translation(-offset[0], -offset[1]), atol=1e-6)
            assert r.info["bands"]["optical"]["bands"] == [3, 2, 1] and r.info["bands"]["sar"]["names"] == ["VV"]
            assert r.agreement is not None and r.agreement.ok and len(r.tiles) == 1
            fits[offset] = r
        assert _corner_error(fits[OFFSET], fits[(0.0, 0.0)].model.matrix) < 1.0, p["id"]
        assert _corner_error(fits[OFFSET], np.eye(3)) < 2.0, p["id"]


def test_thirteen_band_optical_and_nan_bordered_db_sar_need_no_conversion(tmp_path: Path, ben_pairs: list[dict],
                                                                         matcher_lite) -> None:
    """A Sentinel-2 L1C-like 13-band stack (no descriptions) is read as bands 4,3,2 and a dual-pol dB SAR with a
    NaN border (nodata NaN) is masked: same answer as the 4-band / clean inputs."""
    p = ben_pairs[2]

    def thirteen(data, desc):  # B01..B12 order: B02, B03, B04 at 2, 3, 4; B08 at 8; others filled with B08
        out = np.stack([data[3]] * 13)
        out[1], out[2], out[3], out[7] = data[0], data[1], data[2], data[3]
        return out, [None] * 13

    def nan_border(data, desc):
        data = data.copy()
        data[:, :, :12] = np.nan
        return data, desc

    opt13 = _copy(GEO_ROOT / p["optical"], tmp_path / "s2_13.tif", edit=thirteen)
    sar = _copy(GEO_ROOT / p["sar"], tmp_path / "s1.tif", OFFSET)
    sar_nan = _copy(GEO_ROOT / p["sar"], tmp_path / "s1_nan.tif", OFFSET, edit=nan_border, nodata=float("nan"))
    ref = scene.estimate_scene(GEO_ROOT / p["optical"], sar, matcher_lite, scene.SceneOptions(figures=False))
    for opt, s in ((opt13, sar), (GEO_ROOT / p["optical"], sar_nan)):
        r = scene.estimate_scene(opt, s, matcher_lite, scene.SceneOptions(figures=False))
        assert r.has_transform and r.status == ref.status, r.reason
        assert _corner_error(r, ref.model.matrix) < 1.0
    assert r.info["bands"]["sar"]["bands"] == [1]
    r13 = scene.estimate_scene(opt13, sar, matcher_lite, scene.SceneOptions(figures=False))
    assert r13.info["bands"]["optical"]["bands"] == [4, 3, 2] and "Sentinel-2" in r13.info["bands"]["optical"]["rule"]


@pytest.fixture(scope="module")
def os_sift() -> None:
    if not OS_SIFT_SAR.is_file():
        pytest.skip(f"OS-SIFT pair not found at {OS_SIFT} (shared data)")


@pytest.mark.parametrize("radius", ["150m", None])
def test_os_sift_geographic_crs_through_scene(tmp_path: Path, os_sift: None, radius: str | None) -> None:
    """EPSG:4326, ~1 m pixels, SAR georeferencing ~74 m off: one tile (the scene fits the working size), metres
    computed at the scene's latitude (150 m -> ~150 px, not 1.5e7), within 5 px of the reference translation."""
    out = tmp_path / "out"
    args = ["scene", str(OS_SIFT_OPTICAL), str(OS_SIFT_SAR), "--out", str(out), "--no-figures", "--top-k", "1024",
            "--quiet"] + (["--search-radius", radius] if radius else [])
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    r = json.loads((out / "result.json").read_text())
    assert r["tiles"]["processed"] == 1 and r["agreement"]["ok"] and 140 <= r["search_radius_px"] <= 160
    model = scene.GlobalModel.from_dict(r["global_model"])
    g = np.stack(np.meshgrid(np.linspace(0, 1091, 5), np.linspace(0, 1091, 5)), -1).reshape(-1, 2)
    err = np.abs(model.apply(g) - (g + OS_SIFT_H[:2, 2])).max()
    assert err < 5.0, err
    assert 60 < r["rmse_before_m"] < 90 and 0 < r["rmse_after_m"] < 5  # metres, not degrees ("0.00 m")
    assert 0.99 < r["sar_metres_per_pixel"][0] < 1.01


def test_scene_uncertain_warns_and_strict_exits_6(tmp_path: Path, ben_pairs: list[dict]) -> None:
    """A 120 px Sentinel chip pair is fitted by the whole-tile area shift alone: verdict uncertain, a warning and
    exit 0, the registered SAR written; with --strict exit 6 (result.json still written)."""
    p = ben_pairs[0]
    args = ["scene", str(GEO_ROOT / p["optical"]), str(GEO_ROOT / p["sar"]), "--no-figures"]
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "a")])
    r = json.loads((tmp_path / "a" / "result.json").read_text())
    assert res.exit_code == 0 and r["status"] == "uncertain" and "verdict uncertain" in res.output, res.output
    assert (tmp_path / "a" / "registered_sar.tif").is_file() and 0.0 <= r["confidence"] <= 1.0
    assert all("verdict" in t for t in r["tile_qc"])
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "b"), "--strict"])
    assert res.exit_code == 6 and (tmp_path / "b" / "result.json").is_file(), res.output


def test_os_sift_on_a_local_utm_grid(tmp_path: Path, os_sift: None) -> None:
    """--grid utm: the EPSG:4326 scene is worked on and written on its UTM zone (square ~1 m pixels); the ~74 m
    georeferencing error of the SAR is corrected as on the geographic grid."""
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["scene", str(OS_SIFT_OPTICAL), str(OS_SIFT_SAR), "--out", str(out), "--grid", "utm",
                                   "--no-figures", "--top-k", "1024", "--quiet"])
    assert res.exit_code == 0, res.output
    r = json.loads((out / "result.json").read_text())
    assert r["grid"] == "utm" and r["optical"]["crs"] == "EPSG:32615" and r["optical_file"]["crs"] == "EPSG:4326"
    assert r["status"] == "ok" and 60 < r["correction_m"] < 90 and r["rmse_after_m"] < 5
    with rasterio.open(out / "registered_sar.tif") as ds:
        assert ds.crs.to_epsg() == 32615 and abs(ds.res[0] - ds.res[1]) < 1e-9 and 0.9 < ds.res[0] < 1.1
    applied = tmp_path / "applied.tif"  # apply on the same UTM grid reproduces the product exactly
    assert CliRunner().invoke(app, ["apply", str(out / "result.json"), str(OS_SIFT_SAR), "--out", str(applied)]).exit_code == 0
    with rasterio.open(out / "registered_sar.tif") as a, rasterio.open(applied) as b:
        assert a.transform == b.transform and np.array_equal(a.read(), b.read(), equal_nan=True)
