"""Every registered method on a small generated pair; the runner and report end to end."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from promptmid.geometry import corner_error
from promptmid.evaluation.methods import METHODS, build_method, default_methods
from promptmid.io import load_image
from promptmid.matching import fit_geometry
from promptmid.synth import make_pair

SIZE = 256
# methods that recover the generated transform within 5 px; the others must return well-formed output.
# sift-ratio genuinely fails on the synthetic speckled SAR (a handful of matches, corner error ~10 px).
RECOVER = {"promptmid-xfeat", "promptmid-lite", "xfeat-mnn", "xfeat-lighterglue", "aliked-mnn", "disk-lightglue", "rift"}


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def pair() -> tuple:
    p = make_pair(SIZE, 3)
    return p, load_image(p.optical, "optical"), load_image(p.sar, "sar")


def check_output(out: dict) -> None:
    k = len(out["points0"])
    assert out["points0"].shape == (k, 2) and out["points1"].shape == (k, 2) and out["scores"].shape == (k,)
    assert set(out["timings"]) >= {"features", "matching"}


def affine_corner_error(out: dict, truth: np.ndarray, optical=None, sar=None) -> float:
    """Corner error of the affine fit of a method's matches (refined as the runner's ``+refine`` rows
    when the images are given)."""
    from promptmid.refine import refine_prepared

    g = fit_geometry(out["points0"], out["points1"], "affine", 3.0)
    if not g.ok:
        return float("inf")
    matrix = refine_prepared(optical, sar, g.matrix).matrix if optical is not None else g.matrix
    return float(corner_error(matrix, truth, (SIZE, SIZE)).mean())


@pytest.mark.parametrize("name", [n for n in default_methods()])
def test_method_on_generated_pair(name: str, pair: tuple) -> None:
    truth, optical, sar = pair
    out = build_method(name)(optical, sar)
    check_output(out)
    if name in RECOVER:
        assert affine_corner_error(out, truth.H, optical, sar) < 5.0


def test_rift_recovers_rotation_and_shift() -> None:
    c = (SIZE - 1) / 2
    m = cv2.getRotationMatrix2D((c, c), 20.0, 1.0)
    m[:, 2] += [8.0, -5.0]
    H = np.vstack([m, [0.0, 0.0, 1.0]])
    p = make_pair(SIZE, 3, H=H)
    out = build_method("rift")(load_image(p.optical, "optical"), load_image(p.sar, "sar"))
    assert affine_corner_error(out, H) < 5.0


def test_rotation_search_maps_back(pair: tuple) -> None:
    """A 90-deg rotated SAR image: search over rotations must return points in the original SAR frame."""
    truth, optical, _ = pair
    rot = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, SIZE - 1.0], [0.0, 0.0, 1.0]])  # (x, y) -> (y, W-1-x)
    sar_rot = np.ascontiguousarray(np.rot90(truth.sar))  # rotated by 90 deg counter-clockwise
    out = build_method("xfeat-mnn", rotations=[0, 270])(optical, load_image(sar_rot, "sar"))
    assert out["rotation_deg"] == 270.0  # rotate_prepared turns counter-clockwise: 270 undoes rot90
    assert affine_corner_error(out, rot @ truth.H) < 5.0


def test_registry_errors() -> None:
    with pytest.raises(ValueError, match="valid"):
        build_method("nope")
    with pytest.raises(ValueError, match="Unknown method .* option"):
        build_method("sift-ratio", bogus=1)
    assert METHODS["rift"].rotation_invariant and "promptmid-full" not in default_methods()


def test_runner_and_report(tmp_path, pair: tuple) -> None:
    """Write a manifest of the generated pair plus an unreadable one; both appear in the tables."""
    import json

    from promptmid.demo import write_demo_inputs
    from promptmid.evaluation.manifest import read_manifest
    from promptmid.evaluation.runner import run_and_report
    from promptmid.evaluation.runner import EvalConfig

    truth = pair[0]
    opt, sar = write_demo_inputs(tmp_path / "img", truth.optical, truth.sar)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    lines = [{"id": "gen/1", "optical": str(opt), "sar": str(sar), "H": truth.H.tolist(), "source": "gen"},
             {"id": "gen/2", "optical": "bad.png", "sar": str(sar), "H": truth.H.tolist(), "source": "gen"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    conf = EvalConfig(["sift-ratio", "rift"], cache_dir=str(tmp_path / "cache"))
    result = run_and_report(read_manifest(manifest), conf, tmp_path / "out")
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # pairs x methods x (affine, homography) x (raw, +refine)
    assert {r["status"] for r in rows if r["pair"] == "gen/2"} == {"error"}
    rift = [r for r in rows if r["pair"] == "gen/1" and r["method"] == "rift" and r["model"] == "affine"][0]
    assert rift["status"] == "ok" and rift["corner_error"] < 5.0
    for name in ("pairs.csv", "summary.md", "summary.json", "mma.png", "corner_cdf.png", "checkerboards.png",
                 "summary.html"):
        assert (tmp_path / "out" / name).is_file()
    assert "image error" in (tmp_path / "out" / "summary.md").read_text()
    page = (tmp_path / "out" / "summary.html").read_text()
    assert 'data-pair="gen/1"' in page and 'data-pair="gen/2"' not in page  # an unreadable pair has no picture
    # strict JSON although the failed pair has infinite errors (NaN/Infinity would not parse elsewhere)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in summary.json"))
    assert summary["overall"]["sift-ratio"]["affine"]["median_corner_error"] is None or \
        isinstance(summary["overall"]["sift-ratio"]["affine"]["median_corner_error"], float)
    assert any((tmp_path / "cache").rglob("*.npz"))
    again = run_and_report(read_manifest(manifest), conf, tmp_path / "out2", figures=False)["rows"]
    assert [r["corner_error"] for r in again] == [r["corner_error"] for r in rows]  # from the cache


def test_cached_matches_of_other_settings_are_recomputed(tmp_path, pair: tuple, monkeypatch) -> None:
    """A cache entry records its method's settings fingerprint: an entry of the same settings (or one from before
    fingerprints) is reused, one of other settings (e.g. a preset changed since) is recomputed and overwritten; the
    fingerprint follows the resolved preset configuration."""
    import json
    from pathlib import Path

    from promptmid.config import PRESETS
    from promptmid.evaluation import methods
    from promptmid.evaluation.manifest import Pair
    from promptmid.evaluation.runner import EvalConfig, _load_cached, cache_path, matches_for

    truth = pair[0]
    optical, sar = load_image(truth.optical, "optical"), load_image(truth.sar, "sar")
    conf = EvalConfig(["sift-ratio"], cache_dir=str(tmp_path))
    record = Pair("gen/1", Path("o.png"), Path("s.png"), "gen", np.asarray(truth.H))
    path = cache_path(str(tmp_path), "sift-ratio", [0.0], record.id)
    fresh = matches_for("sift-ratio", record, (optical, sar), "", conf)
    assert len(fresh["points0"]) > 5 and _load_cached(path)["settings"] == methods.settings_fingerprint("sift-ratio")

    def rewrite(settings: str | None) -> None:  # the entry as another version would have left it: one match only
        with np.load(path) as z:
            info = {k: v for k, v in json.loads(str(z["info"])).items() if k != "settings"}
        np.savez(path, points0=np.zeros((1, 2)), points1=np.zeros((1, 2)), scores=np.zeros(1),
                 info=json.dumps({**info, **({"settings": settings} if settings else {})}))

    rewrite(methods.settings_fingerprint("sift-ratio"))
    assert len(matches_for("sift-ratio", record, (optical, sar), "", conf)["points0"]) == 1  # reused
    rewrite(None)
    assert len(matches_for("sift-ratio", record, (optical, sar), "", conf)["points0"]) == 1  # before fingerprints
    rewrite("0123456789abcdef")
    assert len(matches_for("sift-ratio", record, (optical, sar), "", conf)["points0"]) == len(fresh["points0"])
    assert _load_cached(path)["settings"] == methods.settings_fingerprint("sift-ratio")  # overwritten

    before = methods.settings_fingerprint("promptmid-lite")
    methods.settings_fingerprint.cache_clear()
    monkeypatch.setitem(PRESETS["lite"], "sources", {"dinov2": {"long_side": 224}})
    assert methods.settings_fingerprint("promptmid-lite") != before
    monkeypatch.undo()
    methods.settings_fingerprint.cache_clear()
    assert methods.settings_fingerprint("promptmid-lite") == before


def test_eval_reports_the_products_verdict_not_a_rejudgement() -> None:
    """The eval's qc_status is the chosen candidate's verdict as the product gives it (e.g. an area hypothesis capped
    at uncertain although its evidence alone would say ok), and failed without a fit."""
    from promptmid.evaluation.runner import qc_columns
    from promptmid.qc import Verdict
    from promptmid.selection import Candidate

    evidence = {"dense_offset_px": 0.0, "dense_peak": 0.9, "dense_distinctness": 0.5, "dense_at_zero": 0.9}
    capped = Candidate("area 1", np.eye(3), None, evidence, Verdict("uncertain", 0.99, evidence, ["capped"]))
    cols = qc_columns(capped, None)
    assert cols["qc_status"] == "uncertain" and cols["qc_confidence"] == 0.99 and cols["qc_dense_peak"] == 0.9
    assert qc_columns(None, None)["qc_status"] == "failed"
