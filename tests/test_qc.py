"""QC verdict: right transforms are ``ok``; unrelated images and self-consistent wrong transforms are not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from promptmid import qc, selection
from promptmid.api import Matcher
from promptmid.errors import ModelError
from promptmid.geometry import apply_transform, translation
from promptmid.io import load_image
from promptmid.matching import fit_geometry
from promptmid.synth import make_pair, speckle
from promptmid.training.qc import calibrate, fit_logistic, thresholds

SIZE = 512


def _prepared(optical: np.ndarray, sar: np.ndarray):
    return load_image(optical, "optical"), load_image(sar, "sar")


def _forced_matches(matrix: np.ndarray, n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matches that agree exactly (0.5 px noise) with ``matrix``: what a biased descriptor would give."""
    rng = np.random.default_rng(seed)
    p0 = rng.uniform(60, SIZE - 60, (n, 2))
    p1 = apply_transform(matrix, p0) + rng.normal(0, 0.5, (n, 2))
    return p0, p1, np.full(n, 0.8, np.float32)


def _verdict(optical, sar, matrix):
    opt, sar_img = _prepared(optical, sar)
    p0, p1, scores = _forced_matches(matrix)
    geom = fit_geometry(p0, p1)
    _final, _info, evidence = selection.assess(opt, sar_img, p0, p1, scores, geom)
    return qc.judge(evidence)


def periodic_pair(period: int = 64, shift: tuple[float, float] = (20.0, 12.0), seed: int = 3):
    """A texture that repeats every ``period`` px in x and y; the SAR is the optical shifted by ``shift``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)

    def texture(dx: float, dy: float) -> np.ndarray:
        x, y = xx + dx, yy + dy  # SAR pixel (x, y) shows optical pixel (x - dx, y - dy)
        return 0.5 + 0.2 * np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period) + 0.1 * (
            np.cos(4 * np.pi * x / period) > 0.6)

    optical = texture(0, 0)
    sar = speckle(texture(-shift[0], -shift[1]) ** 2, 8.0, rng)
    return optical.astype(np.float32), sar.astype(np.float32), translation(*shift)


def test_right_transform_is_ok():
    pair = make_pair(SIZE, seed=5)
    v = _verdict(pair.optical, pair.sar, pair.H)
    assert v.status == "ok", v
    assert v.evidence["dense_offset_px"] <= 3.0


def test_self_consistent_wrong_transform_is_not_ok():
    pair = make_pair(SIZE, seed=5)
    v = _verdict(pair.optical, pair.sar, translation(30.0, -25.0) @ pair.H)
    assert v.status != "ok", v
    assert v.evidence["dense_offset_px"] > 10.0


def test_periodic_texture_one_period_off_is_not_ok():
    optical, sar, truth = periodic_pair()
    v = _verdict(optical, sar, translation(64.0, 0.0) @ truth)  # one period off: locally perfect
    assert v.status != "ok", v
    assert v.evidence["dense_distinctness"] < 0.05


def test_ambiguous_dense_correlation_vetoes_ok():
    """A confident fit whose dense correlation has no distinct peak is at most uncertain, and says why."""
    evidence = {"dense_offset_px": 1.0, "dense_peak": 0.43, "dense_distinctness": 0.001, "refine_inlier_ratio": 0.78,
                "anisotropy": 0.004}
    assert all(vetoed is False for vetoed, _ in qc.vetoes({**evidence, "dense_distinctness": 0.1}))
    v = qc.verdict_of(evidence)
    assert v.status != "ok" and any("no distinct peak" in r for r in v.reasons), v


def test_unrelated_images_are_not_ok():
    a, b = make_pair(SIZE, seed=21), make_pair(SIZE, seed=22)
    r = Matcher("lite").match(a.optical, b.sar)
    assert r.status != "ok", (r.status, r.confidence, r.reason)
    assert r.confidence < 0.5


def test_real_match_is_ok_and_carries_evidence():
    pair = make_pair(SIZE, seed=11, H=translation(40.0, -30.0))
    r = Matcher("lite").match(pair.optical, pair.sar)
    assert r.status == "ok" and r.confidence >= qc.load_qc_model().ok_threshold
    d = r.to_dict()
    assert d["qc"]["status"] == "ok" and "dense_offset_px" in d["qc"]["evidence"]
    json.dumps(d["qc"], allow_nan=False)


def test_refinement_that_lowers_dense_correlation_is_rejected():
    before = {"dense_at_zero": 0.30, "dense_offset_px": 0.0}
    ok, _ = qc.refinement_agrees(before, {"dense_at_zero": 0.35, "dense_offset_px": 0.0})
    assert ok
    ok, why = qc.refinement_agrees(before, {"dense_at_zero": 0.25, "dense_offset_px": 0.0})
    assert not ok and "dropped" in why
    ok, why = qc.refinement_agrees(before, {"dense_at_zero": 0.40, "dense_offset_px": 6.0})
    assert not ok and "moved" in why


def test_logistic_fit_separates_and_thresholds_reach_precision():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] + 0.3 * rng.normal(size=400) > 0).astype(float)
    coef, intercept = fit_logistic(x, y, l2=0.1)
    assert coef[0] > 2 * abs(coef[1])
    conf = 1 / (1 + np.exp(-(x @ coef + intercept)))
    ok, fail = thresholds(conf, y)
    assert y[conf >= ok].mean() >= 0.98 and 0 <= fail <= ok
    assert y[conf < fail].mean() <= 0.02 if (conf < fail).any() else True


def test_calibrate_refuses_one_sided_rows():
    rows = [{"model": "affine+refine", "status": "ok", "rmse": 1.0, **{f"qc_{k}": 1.0 for k in
            ("inliers", "inlier_ratio", "rmse_px", "coverage", "competitor_ratio", "backward_px", "score_margin",
             "refine_agreement", "refine_inlier_ratio", "refine_shift_px", "dense_offset_px", "dense_distinctness",
             "dense_peak", "anisotropy")}} for _ in range(30)]
    with pytest.raises(ValueError, match="all right or all wrong"):
        calibrate(rows)


def test_tampered_qc_model_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "qc.json"
    bad.write_text(qc.QC_MODEL.read_text().replace('"intercept": ', '"intercept": 1 + '))
    monkeypatch.setattr(qc, "QC_MODEL", bad)
    qc.load_qc_model.cache_clear()
    try:
        with pytest.raises(ModelError, match="sha256"):
            qc.load_qc_model()
    finally:
        qc.load_qc_model.cache_clear()


def _uncertain_result():
    from promptmid.api import MatchResult

    empty = np.zeros((0, 2))
    return MatchResult("uncertain", np.eye(3), empty, empty, np.zeros(0), np.zeros(0, bool), "affine",
                       reason="confidence 0.40 below 0.66", confidence=0.4)


def test_uncertain_warns_and_strict_exits_6(tmp_path, capsys):
    import typer

    from promptmid.cli import report

    report(_uncertain_result(), tmp_path, quiet=True, json_out=False)  # exit 0, a warning
    assert "uncertain" in capsys.readouterr().err
    with pytest.raises(typer.Exit) as exc:
        report(_uncertain_result(), tmp_path, quiet=True, json_out=False, strict=True)
    assert exc.value.exit_code == 6
