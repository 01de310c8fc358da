"""End to end: the Python API recovers known transforms (generated demo pair, real pairs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from promptmid.api import Matcher
from promptmid.io import rotate_prepared, rotation_steps
from promptmid.config import get_config
from promptmid.geometry import corner_error
from promptmid.io import load_image
from promptmid.geometry import apply_transform

# Real pairs (exact ground truth, unseen sources) that lite registers with 1-2 px corner error.
REAL_PAIRS = ["rift/pair1", "msg/pair12", "3mos/Redarsat_city_1"]


def test_presets_and_overrides():
    conf = get_config("lite", {"geometry": {"model": "homography"}, "sources": {"dinov2": None}})
    assert conf["geometry"]["model"] == "homography" and conf["geometry"]["threshold"] == 3.0
    assert conf["sources"]["dinov2"] is None
    with pytest.raises(ValueError, match="valid: xfeat, lite"):
        get_config("nope")


def test_rotation_helpers():
    assert rotation_steps(90) == [0.0, 90.0, 180.0, 270.0]
    with pytest.raises(ValueError):
        rotation_steps(0)
    img = load_image(np.random.default_rng(0).random((60, 100)).astype(np.float32), "sar")
    rot, back = rotate_prepared(img, 90)
    assert rot.image.shape[:2] == (100, 60)
    # a pixel of the rotated image maps back onto the same value in the original
    x, y = 10, 20
    ox, oy = apply_transform(back, np.array([[x, y]]))[0].round().astype(int)
    assert np.isclose(rot.image[y, x, 0], img.image[oy, ox, 0])


def test_lite_recovers_demo_pair(matcher_lite, demo_pair):
    r = matcher_lite.match(demo_pair.optical, demo_pair.sar)
    assert r.ok, r.reason
    assert corner_error(r.transform, demo_pair.H, (512, 512)).mean() < 5.0
    assert r.num_inliers >= 15 and r.rmse < 3.0
    d = r.to_dict()
    json.dumps(d)  # JSON-ready
    assert set(d["timings"]) >= {"keypoints", "dinov2", "matching", "fitting", "total"}
    assert d["models"]["dinov2"]["name"].startswith("dinov2") and d["status"] == "ok"


def test_rotation_search_recovers_a_rotated_sar(matcher_xfeat, demo_pair):
    import cv2

    sar90 = np.ascontiguousarray(np.rot90(demo_pair.sar, k=1))  # 90 deg counter-clockwise
    m = Matcher("xfeat", {"geometry": {"rotations": [0, 90, 180, 270]}})
    r = m.match(demo_pair.optical, sar90)
    assert r.ok
    # rot90 (CCW) maps SAR (x, y) to (y, W-1-x)
    w = demo_pair.sar.shape[1]
    rot = np.array([[0, 1, 0], [-1, 0, w - 1], [0, 0, 1]], float)
    assert corner_error(r.transform, rot @ demo_pair.H, (512, 512)).mean() < 8.0
    assert r.rotation_scores["270"] == max(r.rotation_scores.values()) or r.rotation_deg in (90.0, 270.0)
    del cv2


def test_failed_fit_reports_no_transform(matcher_xfeat):
    rng = np.random.default_rng(0)
    a = rng.random((128, 128)).astype(np.float32)
    b = rng.random((128, 128)).astype(np.float32)
    m = Matcher("xfeat", {"geometry": {"min_inliers": 50}, "search": {"enabled": False}})  # keypoints only
    r = m.match(a, b)
    assert not r.ok and r.transform is None and r.reason
    assert r.to_dict()["transform"] is None and r.to_dict()["status"] == "failed"


@pytest.mark.realdata
@pytest.mark.parametrize("pair_id", REAL_PAIRS)
def test_lite_registers_real_pairs(matcher_lite, optsar_root, pair_id):
    lines = {json.loads(x)["id"]: json.loads(x) for x in (optsar_root / "all.jsonl").read_text().splitlines()}
    if pair_id not in lines:
        pytest.skip(f"{pair_id} not in {optsar_root / 'all.jsonl'}")
    item = lines[pair_id]
    r = matcher_lite.match(optsar_root / item["optical"], optsar_root / item["sar"])
    assert r.ok, r.reason
    err = corner_error(r.transform, np.array(item["H"]), tuple(r.image_sizes["optical"]))
    assert err.mean() < 5.0, f"{pair_id}: corner error {err.mean():.1f} px"
