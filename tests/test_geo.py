"""Georeferencing: conventions, geo prior, products in map coordinates, CRS mismatch.

Generated GeoTIFF pairs (UTM 33N, 10 m pixels): the SAR pixels show the same scene and its
geotransform is off by a known rotation and shift in map units. Synthetic SAR is lightly speckled
(30 looks) and the scene has no towns (see synth.synthetic_scene: building shadows / double bounce
bias matches by ~1 px); even then XFeat matches on this synthetic modality gap keep a content
bias of a few tenths of a pixel, hence the grid-RMS criterion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from promptmid import geo, synth, scene
from promptmid.api import Matcher
from promptmid.errors import InputError
from promptmid.geometry import apply_transform, translation
from promptmid.outputs import prepare_out_dir
from promptmid.scene.products import write_gcp_vrt

ROT_DEG, SHIFT_M = 1.0, (60.0, -40.0)


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher("xfeat")


def grid_error(model_t: np.ndarray, truth: np.ndarray, size: int) -> np.ndarray:
    g = np.stack(np.meshgrid(np.linspace(0, size - 1, 9), np.linspace(0, size - 1, 9)), -1).reshape(-1, 2)
    return np.linalg.norm(apply_transform(model_t, g) - apply_transform(truth, g), axis=1)


# ----------------------------------------------------------------------------- fast unit tests


def test_pixel_centre_convention() -> None:
    a = Affine(10, 0, 500000, 0, -10, 5100000)
    np.testing.assert_allclose(geo.pixel_to_map(a, np.array([[0.0, 0.0], [-0.5, -0.5]])),
                               [[500005, 5099995], [500000, 5100000]])


def test_geo_prior_and_map_transform() -> None:
    crs = rasterio.crs.CRS.from_epsg(32633)
    opt = geo.Grid(100, 100, 1, "uint8", crs, Affine(10, 0, 500000, 0, -10, 5100000))
    sar = geo.Grid(50, 50, 1, "float32", crs, Affine(20, 0, 500100, 0, -20, 5100000))
    prior = geo.geo_prior(opt, sar)
    # optical pixel (9.5, 9.5) is map corner (500100, 5099900) = SAR pixel (-0.5, 4.5)
    np.testing.assert_allclose(apply_transform(prior, np.array([[9.5, 9.5]])), [[-0.5, 4.5]])
    np.testing.assert_allclose(geo.map_transform(prior, opt, sar), np.eye(3), atol=1e-9)
    with pytest.raises(InputError, match="one CRS"):
        geo.geo_prior(opt, geo.Grid(50, 50, 1, "float32", rasterio.crs.CRS.from_epsg(4326), sar.transform))


def test_search_radius() -> None:
    assert geo.parse_search_radius("500m", 10.0) == 50
    assert geo.parse_search_radius("64px", 10.0) == 64
    assert geo.parse_search_radius("30", None) == 30
    assert geo.parse_search_radius("auto", 10.0) == 64 and geo.parse_search_radius("auto", 1.0) == 150
    assert geo.parse_search_radius("auto", None) == 64
    with pytest.raises(InputError):
        geo.parse_search_radius("500m", None)
    with pytest.raises(InputError):
        geo.parse_search_radius("far", 10.0)


def test_metres_per_pixel_in_a_geographic_crs() -> None:
    """Degrees are not metres: a 1e-5 deg pixel at 41 N is ~0.84 m wide and ~1.11 m tall (ellipsoid), and the
    search radius / RMSE in metres follow from that, never from the degree value itself."""
    crs4326 = rasterio.crs.CRS.from_epsg(4326)
    t = Affine(1e-5, 0, -95.92, 0, -1e-5, 41.32)
    mx, my = geo.metres_per_pixel(crs4326, t, 1000, 1000)
    assert abs(mx - 1e-5 * 111320 * np.cos(np.radians(41.315))) < 0.01 and abs(my - 1.11) < 0.01
    info = geo.Grid(1000, 1000, 1, "uint16", crs4326, t)
    assert info.pixel_size < 1e-4 and min(info.metres_per_pixel) > 0.8  # the map-unit size would give 1.5e7 px
    assert abs(geo.parse_search_radius("150m", min(info.metres_per_pixel)) - 150 / mx) < 1e-6
    utm = geo.Grid(10, 10, 1, "uint16", rasterio.crs.CRS.from_epsg(32633), Affine(10, 0, 5e5, 0, -10, 5e6))
    assert utm.metres_per_pixel == (10.0, 10.0)
    feet = rasterio.crs.CRS.from_epsg(2227)  # California zone 3, US survey feet
    assert abs(geo.metres_per_pixel(feet, Affine(1, 0, 0, 0, -1, 0), 10, 10)[0] - 0.3048006) < 1e-6
    assert np.allclose(geo.residuals_m(np.array([[3.0, 4.0]]), (1.0, 2.0)), [np.hypot(3, 8)])


def test_overlap_bbox() -> None:
    prior = translation(-300, 0)  # optical x -> SAR x - 300
    assert geo.overlap_bbox(prior, (1000, 500), (400, 500)) == (300, 0, 700, 500)
    assert geo.overlap_bbox(translation(-5000, 0), (1000, 500), (400, 500)) is None


def test_gcp_vrt_is_readable(tmp_path: Path) -> None:
    crs = rasterio.crs.CRS.from_epsg(32633)
    sar = tmp_path / "s.tif"
    synth.write_geotiff(sar, np.ones((1, 64, 64), np.float32), crs, Affine(10, 0, 0, 0, -10, 0), 0)
    info = geo.Grid(64, 64, 1, "float32", crs, None, 0)
    px, xy = np.array([[1.0, 2.0], [30.0, 40.0], [60.0, 5.0]]), np.array([[500010.0, 5e6], [5e5, 4.9e6], [6e5, 5e6]])
    write_gcp_vrt(tmp_path / "g.vrt", sar, info, px, xy, crs)
    with rasterio.open(tmp_path / "g.vrt") as src:
        gcps, gcp_crs = src.gcps
        assert gcp_crs == crs and len(gcps) == 3
        assert (gcps[1].col, gcps[1].row, gcps[1].x, gcps[1].y) == (30.5, 40.5, 5e5, 4.9e6)
        assert src.read(1).mean() == 1.0


# ----------------------------------------------------------------------------- georeferenced pairs


def _register(pair: dict, out: Path, matcher: Matcher, **kw) -> dict:
    opts = scene.SceneOptions(tile=512, overlap=64, search_radius="200m", **kw)
    return scene.register_scene(pair["optical"], pair["sar"], prepare_out_dir(out), matcher, opts).to_dict()


def test_geo_pair_recovered_within_one_pixel(tmp_path: Path, matcher: Matcher) -> None:
    size = 768
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", size, seed=3, rotation_deg=ROT_DEG, shift_m=SHIFT_M,
                                        towns=False)
    r = _register(pair, tmp_path / "out", matcher)
    assert r["status"] == "ok", r["reason"]
    # 768 px fits the matcher's working size (1024): one tile, not 4 overlapping ones that could disagree
    assert r["prior"]["kind"] == "geo" and r["tiles"]["processed"] == r["tiles"]["grid"] == 1
    err = grid_error(np.array(r["transform"]), pair["H"], size)
    # optical px = output px (10 m). NOT sub-pixel here: XFeat matches across this synthetic modality
    # gap carry a systematic ~1 px bias (1.03 px grid RMS on 1024 px / 9 tiles, 1.7 px on 768 px /
    # 4 tiles); the pipeline itself is sub-pixel exact (next test).
    assert np.sqrt(np.mean(err**2)) < 2.0, err
    # the same answer in map units: the SAR georeferencing error E
    x = geo.pixel_to_map(pair["optical_transform"], np.array([[0.0, 0.0], [size - 1.0, size - 1.0]]))
    map_err = apply_transform(np.array(r["map_transform"]), x) - apply_transform(pair["E"], x)
    assert np.abs(map_err).max() < 45.0  # metres at the scene corners (extrapolation of the ~1-2 px bias)
    assert r["rmse_before_px"] > 5 > r["rmse_after_px"]
    out = tmp_path / "out"
    with rasterio.open(pair["optical"]) as o, rasterio.open(out / "registered_sar.tif") as s:
        assert (s.crs, s.transform, s.nodata, s.width, s.height) == (o.crs, o.transform, o.nodata, o.width, o.height)
        assert s.profile["tiled"] and s.profile["compress"] == "deflate"
    lines = (out / "tiepoints.csv").read_text().splitlines()
    assert lines[0].startswith("tile,optical_x,optical_y,map_x,map_y,sar_x") and len(lines) == r["tiepoints"] + 1
    gj = json.loads((out / "tiepoints.geojson").read_text())
    assert len(gj["features"]) == r["tiepoints"] and "residual_px" in gj["features"][0]["properties"]
    with rasterio.open(out / "sar_gcps.vrt") as v:
        assert len(v.gcps[0]) == r["inliers"]
    assert (out / "tile_map.png").stat().st_size > 0
    assert [t["status"] for t in r["tile_qc"]] == ["ok"] and r["agreement"]["ok"]


def test_geometry_chain_is_subpixel_without_modality_gap(tmp_path: Path, matcher: Matcher) -> None:
    """Same scene, "SAR" = speckled optical luminance: geo prior, chips, merge and fit add no bias."""
    size = 512
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", size, seed=4, rotation_deg=ROT_DEG, shift_m=SHIFT_M,
                                        sar_from_optical=True)
    r = _register(pair, tmp_path / "out", matcher, figures=False)
    assert r["status"] == "ok", r["reason"]
    assert grid_error(np.array(r["transform"]), pair["H"], size).max() < 0.5


def test_crs_mismatch_is_reprojected(tmp_path: Path, matcher: Matcher) -> None:
    size = 512
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", size, seed=5, rotation_deg=ROT_DEG, shift_m=SHIFT_M,
                                        sar_crs="EPSG:4326", towns=False)
    r = _register(pair, tmp_path / "out", matcher)
    assert r["status"] == "ok", r["reason"]
    assert r["sar_grid"]["reprojected_to_optical_crs"] and r["sar"]["crs"] == "EPSG:4326"
    x = geo.pixel_to_map(pair["optical_transform"], np.array([[0.0, 0.0], [size - 1.0, 0], [0, size - 1.0]]))
    map_err = np.linalg.norm(apply_transform(np.array(r["map_transform"]), x) - apply_transform(pair["E"], x), axis=1)
    # metres; one tile and two resamplings (to EPSG:4326 and back): ~2-4 px modality error as for
    # any single 512 px XFeat pair, against a prior error of ~100 m
    assert map_err.max() < 50.0, map_err
    assert r["rmse_before_m"] > 80
    with rasterio.open(tmp_path / "out" / "registered_sar.tif") as s:
        assert s.crs.to_epsg() == 32633
    # GCPs point at pixels of the SAR *file* (EPSG:4326), not of the reprojected grid
    with rasterio.open(tmp_path / "out" / "sar_gcps.vrt") as v:
        gcps = v.gcps[0]
        assert v.width == rasterio.open(pair["sar"]).width and all(0 <= g.col <= v.width for g in gcps)


def test_non_overlapping_inputs_are_refused(tmp_path: Path, matcher: Matcher) -> None:
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", 256, seed=1, shift_m=(50000.0, 0.0))
    with pytest.raises(InputError, match="do not overlap"):
        _register(pair, tmp_path / "out", matcher)


def test_optical_on_utm_grid(tmp_path: Path) -> None:
    """--grid utm: a geographic optical image is read on its local UTM zone with square metre pixels covering the
    same ground; a UTM image stays as it is; an image without georeferencing is refused."""
    path = tmp_path / "geo4326.tif"
    t = Affine(1e-5, 0, -95.92, 0, -1e-5, 41.32)
    profile = dict(driver="GTiff", width=300, height=200, count=1, dtype="uint8", crs="EPSG:4326", transform=t)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.full((1, 200, 300), 100, np.uint8))
    with rasterio.open(path) as ds:
        vrt, warped = geo.optical_on_utm(ds)
        assert warped and vrt.crs.to_epsg() == 32615 and abs(vrt.res[0] - vrt.res[1]) < 1e-9
        info = geo.geo_info(vrt)
        assert 0.8 < info.metres_per_pixel[0] < 1.2  # ~0.84 x 1.11 m pixels -> ~1 m square ones
        assert abs(info.width * info.metres_per_pixel[0] - 300 * 0.8397) < 30  # the same ground width
        vrt.close()
    utm = tmp_path / "utm.tif"
    with rasterio.open(utm, "w", **{**profile, "crs": "EPSG:32615", "transform": Affine(1, 0, 255000, 0, -1, 4577000)}) as ds:
        ds.write(np.full((1, 200, 300), 100, np.uint8))
    with rasterio.open(utm) as ds:
        assert geo.optical_on_utm(ds) == (ds, False)
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as ds:
        ds.write(np.zeros((1, 64, 64), np.uint8))
    with rasterio.open(plain) as ds, pytest.raises(InputError, match="--grid utm needs a georeferenced"):
        geo.optical_on_utm(ds)
