"""The global area-based search (promptmid.search) and the evidence-based choice between hypotheses (promptmid.selection.choose)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from promptmid.config import DEFAULTS
from promptmid.evaluation.metrics import mean_corner_error
from promptmid.geometry import affine_about_centre
from promptmid.io import load_image
from promptmid.selection import assess_area, choose
from promptmid.search import (Correlator, Level, centre_shift, check_conf, global_search, make_level, search_angles,
                              search_scales)
from promptmid.synth import make_pair

SIZE = 512
REFINE = {k: v for k, v in DEFAULTS["refine"].items() if k != "enabled"}


def _prepared(pair):
    return load_image(pair.optical, "optical"), load_image(pair.sar, "sar")


@pytest.fixture(scope="module")
def displaced():
    H = affine_about_centre((SIZE, SIZE), 11.0, 1.17, 0.04, (47.0, -31.0))
    return make_pair(SIZE, seed=5, H=H)


def test_area_search_alone_registers_displaced_pair(displaced):
    opt, sar = _prepared(displaced)
    hyps = global_search(opt, sar)
    assert hyps, "no hypothesis"
    chosen, candidates = choose(opt, sar, None, hyps, REFINE)
    assert chosen is not None and chosen.source.startswith("area")
    err = mean_corner_error(chosen.transform, displaced.H, (SIZE, SIZE))
    assert err < 2.0, f"mean corner error {err:.2f} px"
    assert chosen.verdict.status == "ok"
    assert len(candidates) == len(hyps)


def test_full_rotation_search_finds_large_rotation():
    H = affine_about_centre((SIZE, SIZE), 100.0, 1.0, 0.0, (20.0, 10.0))
    opt, sar = _prepared(make_pair(SIZE, seed=3, H=H))
    hyps = global_search(opt, sar, {"rotation_range": 180.0, "rotation_step": 6.0})
    errs = [mean_corner_error(h.matrix, H, (SIZE, SIZE)) for h in hyps]
    assert min(errs) < 10.0, f"best hypothesis {min(errs):.1f} px off"


def test_search_respects_its_ranges(displaced):
    opt, sar = _prepared(displaced)
    conf = {"rotation_range": 6.0, "rotation_step": 3.0, "scale_range": (0.9, 1.05), "scale_steps": 3}
    c = check_conf(conf)
    half_scale = math.exp(0.5 * math.log(1.05 / 0.9) / 2)
    for h in global_search(opt, sar, conf):
        assert -6.0 - 1.5 - 1e-9 <= h.angle_deg <= 6.0 + 1.5 + 1e-9
        assert 0.9 / half_scale - 1e-9 <= h.scale <= 1.05 * half_scale + 1e-9
    assert list(search_angles(c)) == [-6.0, -3.0, 0.0, 3.0, 6.0]
    assert np.allclose(search_scales(c), [0.9, math.sqrt(0.9 * 1.05), 1.05])
    # the true displacement (11 deg, 1.17) is outside these ranges: no hypothesis may be within 5 px of it
    assert all(mean_corner_error(h.matrix, displaced.H, (SIZE, SIZE)) > 5.0 for h in global_search(opt, sar, conf))


def test_max_shift_bounds_the_translation(displaced):
    opt, sar = _prepared(displaced)
    free = global_search(opt, sar)
    assert centre_shift(free[0].matrix, opt, sar) > 40  # the true shift is (47, -31) px
    for h in global_search(opt, sar, {"max_shift": 0.05}):
        assert centre_shift(h.matrix, opt, sar) <= 0.05 * SIZE


@pytest.mark.parametrize("bad", [{"scale_range": (1.2, 0.8)}, {"rotation_range": 200.0}, {"top_k": 0},
                                 {"min_overlap": 1.5}, {"nonsense": 1}])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        check_conf(bad)


def test_featureless_pair_is_not_ok():
    rng = np.random.default_rng(0)
    optical = (0.5 + 0.01 * rng.standard_normal((256, 256))).astype(np.float32)
    sar = rng.gamma(1.0, 1.0, (256, 256)).astype(np.float32)
    opt, s = load_image(optical, "optical"), load_image(sar, "sar")
    chosen, _ = choose(opt, s, None, global_search(opt, s), REFINE)
    assert chosen is None or chosen.verdict.status != "ok"


def test_masked_correlation_matches_brute_force():
    rng = np.random.default_rng(1)

    def level(h: int, w: int) -> Level:
        mask = np.ones((h, w), bool)
        mask[: h // 4, : w // 3] = False  # nodata corner
        feats = rng.standard_normal((3, h, w)).astype(np.float32)
        feats[:, ~mask] = 0.0
        lv = Level(np.zeros((h, w), np.float32), mask, np.eye(3))
        lv.features = feats
        return lv

    a, b = level(20, 24), level(26, 22)
    ncc = Correlator(a, b.mask.shape, 0.1).ncc(b)
    for dx, dy in [(0, 0), (3, -2), (-5, 4), (7, 9)]:
        xs, ys = np.meshgrid(np.arange(24), np.arange(20))
        inside = (xs + dx >= 0) & (xs + dx < 22) & (ys + dy >= 0) & (ys + dy < 26)
        fa = a.features[:, ys[inside], xs[inside]]
        fb = b.features[:, ys[inside] + dy, xs[inside] + dx]
        ma, mb = a.mask[ys[inside], xs[inside]], b.mask[ys[inside] + dy, xs[inside] + dx]
        num = (fa * fb).sum()
        ea, eb = (fa ** 2 * mb).sum(), (fb ** 2 * ma).sum()
        assert ncc[dy + 19, dx + 23] == pytest.approx(num / math.sqrt(ea * eb), abs=1e-4)


def test_nodata_never_creates_a_peak():
    """A SAR image with a large nodata block: the block's edge must not correlate with the optical image."""
    H = affine_about_centre((SIZE, SIZE), 0.0, 1.0, 0.0, (30.0, 20.0))
    pair = make_pair(SIZE, seed=7, H=H)
    sar = pair.sar.astype(np.float32).copy()
    sar[: SIZE // 3, :] = np.nan
    opt, s = load_image(pair.optical, "optical"), load_image(sar, "sar")
    level = make_level(s, 128, 1.0, 9)
    assert not level.mask[: 128 // 3].any()
    assert np.all(level.features[:, ~level.mask] == 0)
    hyps = global_search(opt, s)
    assert mean_corner_error(hyps[0].matrix, H, (SIZE, SIZE)) < 8.0


def test_assess_area_keeps_the_better_of_refined_and_unrefined(displaced):
    opt, sar = _prepared(displaced)
    hyp = global_search(opt, sar)[0]
    cand = assess_area(opt, sar, hyp.matrix, "affine", REFINE, "area 1", hyp.score)
    assert cand.refinement is not None
    assert mean_corner_error(cand.transform, displaced.H, (SIZE, SIZE)) <= \
        mean_corner_error(hyp.matrix, displaced.H, (SIZE, SIZE)) + 0.5


def test_matcher_reports_the_weighed_hypotheses(displaced):
    from promptmid.api import Matcher

    r = Matcher("xfeat", {"search": {"skip_when_ok": False}}).match(displaced.optical, displaced.sar)
    assert r.hypothesis in {h["source"] for h in r.hypotheses}
    assert r.hypotheses[0]["source"] == "keypoints" and any(h["source"].startswith("area") for h in r.hypotheses)
    assert mean_corner_error(r.transform, displaced.H, (SIZE, SIZE)) < 2.0
    assert all(np.isfinite(h["mi_peak"]) for h in r.hypotheses)  # weighed by the pick, so in result.json
    from promptmid.report import hypothesis_rows

    rows = hypothesis_rows(r.to_dict(), (SIZE, SIZE))  # the report's table: the kept one marked, at 0 px
    assert [row[1] for row in rows] == [h["source"] for h in r.hypotheses]
    assert [row[7] for row in rows if row[0] == "kept"] == [0.0]
    scores = [h["pick_score"] for h in r.hypotheses]  # what the pick ranked by, in result.json and the report
    assert all(np.isfinite(scores)) and [row[5] for row in rows] == scores
    top = max((h for h in r.hypotheses if h["status"] != "failed"), key=lambda h: h["pick_score"])
    assert mean_corner_error(np.array(top["transform"]), r.transform, (SIZE, SIZE)) <= 5.0  # it, or the same fit
    off = Matcher("xfeat", {"search": {"enabled": False}}).match(displaced.optical, displaced.sar)
    assert [h["source"] for h in off.hypotheses] == ["keypoints"]


def test_search_is_skipped_when_the_keypoint_fit_is_ok(displaced):
    """``search.skip_when_ok`` (default): an ``ok`` keypoint fit is the answer, no area search runs; a call's own
    ``search`` options can turn the skip off."""
    from promptmid.api import Matcher

    matcher = Matcher("xfeat")
    r = matcher.match(displaced.optical, displaced.sar)
    assert r.status == "ok" and r.hypothesis == "keypoints" and "search" not in r.timings
    assert [h["source"] for h in r.hypotheses] == ["keypoints"]
    assert mean_corner_error(r.transform, displaced.H, (SIZE, SIZE)) < 2.0
    forced = matcher.match(displaced.optical, displaced.sar, search={"skip_when_ok": False, "top_k": 1})
    assert "search" in forced.timings and len(forced.hypotheses) >= 1


def test_search_around_a_prior(displaced):
    """With a prior (e.g. a scene tile's place in its chip), the search is relative to it and bounded by max_shift."""
    opt, sar = _prepared(displaced)
    near = affine_about_centre((SIZE, SIZE), 10.0, 1.15, 0.0, (40.0, -25.0))  # a few px from the truth
    hyps = global_search(opt, sar, {"rotation_range": 3.0, "scale_range": (0.95, 1.05), "scale_steps": 3,
                                    "max_shift": 0.05, "top_k": 1}, prior=near)
    assert len(hyps) == 1
    err = mean_corner_error(hyps[0].matrix, displaced.H, (SIZE, SIZE))
    # a similarity search leaves the pair's shear (0.04: ~10 px at the corners) to the refinement
    assert err < 12.0 and err < mean_corner_error(near, displaced.H, (SIZE, SIZE))
    assert centre_shift(np.linalg.inv(near) @ hyps[0].matrix, opt, opt) <= 0.05 * SIZE


def test_noise_pair_is_never_ok_with_the_search():
    rng = np.random.default_rng(0)
    a, b = (rng.random((128, 128)).astype(np.float32) for _ in range(2))
    from promptmid.api import Matcher

    r = Matcher("xfeat", {"geometry": {"min_inliers": 50}}).match(a, b)
    assert not r.ok and r.reason


def test_local_correlation_equals_the_global_one():
    rng = np.random.default_rng(2)

    def level(h: int, w: int) -> Level:
        lv = Level(np.zeros((h, w), np.float32), rng.random((h, w)) > 0.1, np.eye(3))
        lv.features = rng.standard_normal((4, h, w)).astype(np.float32) * lv.mask
        return lv

    a, b = level(30, 28), level(41, 37)
    full = Correlator(a, b.mask.shape, 0.1).ncc(b)
    local = Correlator(a, b.mask.shape, 0.1, local=True).ncc(b)
    assert local.shape == (41 - 30 + 1, 37 - 28 + 1)
    assert np.allclose(local, full[29:29 + local.shape[0], 27:27 + local.shape[1]], atol=1e-4)


def test_correlation_of_channel_groups_equals_correlating_those_channels_alone():
    """Correlator.ncc_sets: the map of a set of channel groups equals the correlation of a level that has only those
    channels (one transform of the canvas serves every set)."""
    rng = np.random.default_rng(4)

    def level(h: int, w: int) -> Level:
        lv = Level(np.zeros((h, w), np.float32), rng.random((h, w)) > 0.1, np.eye(3))
        lv.features = rng.standard_normal((5, h, w)).astype(np.float32) * lv.mask
        return lv

    def only(lv: Level, keep: slice) -> Level:
        out = Level(lv.gray, lv.mask, lv.to_original)
        out.features = np.ascontiguousarray(lv.features[keep])
        return out

    a, b = level(30, 28), level(41, 37)
    groups = [slice(0, 2), slice(2, 5)]
    first, both, second = Correlator(a, b.mask.shape, 0.1, groups=groups).ncc_sets(b, [[0], [0, 1], [1]])
    assert np.allclose(first, Correlator(only(a, groups[0]), b.mask.shape, 0.1).ncc(only(b, groups[0])), atol=1e-5)
    assert np.allclose(second, Correlator(only(a, groups[1]), b.mask.shape, 0.1).ncc(only(b, groups[1])), atol=1e-5)
    assert np.allclose(both, Correlator(a, b.mask.shape, 0.1).ncc(b), atol=1e-5)


def test_pooled_searches_equal_separate_searches(displaced):
    """pooled_search (both searches sharing the coarse level's canvases and FFTs) gives the hypotheses of the
    classical search and of the search with learned channels, run one after the other."""
    from promptmid.search import pooled_search

    opt, sar = _prepared(displaced)
    projection = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32) * 0.3

    def learned(image):  # a deterministic dense map of the image: its colour channels, projected
        return np.ascontiguousarray(image.image @ projection)

    learned.name = "test"
    conf = {"rotation_step": 5.0, "scale_steps": 3}
    pooled = pooled_search(opt, sar, conf, None, [None, learned])
    separate = global_search(opt, sar, conf) + global_search(opt, sar, conf, learned=learned)
    assert [h.source for h in pooled] == [h.source for h in separate] and {h.source for h in pooled} == {
        "area", "area+test"}
    for p, q in zip(pooled, separate):
        assert np.allclose(p.matrix, q.matrix, atol=1e-4) and abs(p.score - q.score) < 1e-5


def test_fine_level_warps_each_cell_once_for_both_searches(displaced, monkeypatch):
    """The polishing of both searches' peaks warps each (rotation, scale) cell once: the canvases made at the fine level
    are the distinct cells tried, fewer than one per peak and cell when the searches' peaks are near each other."""
    import promptmid.search as search
    import promptmid.search_fine as fine

    opt, sar = _prepared(displaced)
    projection = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32) * 0.3

    def learned(image):
        return np.ascontiguousarray(image.image @ projection)

    conf = {"rotation_step": 5.0, "scale_steps": 3}
    fine_canvases, tried = [], 0
    real_canvas, real_all = fine.canvas_of, search.polish_all

    def counting_canvas(base, angle, scale, c):
        if base.gray.shape[0] > search.DEFAULT_CONF["coarse_size"]:  # the fine level's canvases only
            fine_canvases.append((angle, scale))
        return real_canvas(base, angle, scale, c)

    def recording(fines, base, channels, peak_lists, c, prior_scale):
        nonlocal tried
        tried += sum(len(p) for p in peak_lists) * len(fine.POLISH_OFFSETS)  # (peak, cell) pairs polished
        return real_all(fines, base, channels, peak_lists, c, prior_scale)

    monkeypatch.setattr(fine, "canvas_of", counting_canvas)
    monkeypatch.setattr(search, "polish_all", recording)
    hyps = search.pooled_search(opt, sar, conf, None, [None, learned])
    assert hyps and len(fine_canvases) == len(set(fine_canvases))
    assert len(fine_canvases) < tried


def test_learned_channels_search_registers_and_matcher_builds_them(displaced):
    """ALIKED's dense channels stacked onto the gradients: the hypotheses still find the displaced pair, the channels
    cover the image, and a Matcher with search.learned = 'aliked' uses its own ALIKED network for them; by default
    a Matcher runs both searches."""
    from promptmid.api import Matcher
    from promptmid.models.dense_features import SearchFeatures

    opt, sar = _prepared(displaced)
    features = SearchFeatures()
    maps = features(opt)
    assert maps.shape == (SIZE, SIZE, 16) and maps.dtype == np.float32 and np.isfinite(maps).all()
    hyps = global_search(opt, sar, learned=features)
    chosen, _ = choose(opt, sar, None, hyps, REFINE)
    assert chosen is not None and mean_corner_error(chosen.transform, displaced.H, (SIZE, SIZE)) < 2.0
    matcher = Matcher("lite", {"search": {"learned": "aliked"}})
    (channels,) = matcher.search_channels()
    assert channels.net is matcher.describer.extractor.net
    assert Matcher("lite", {"search": {"learned": None}}).search_channels() == [None]
    gradients, aliked = Matcher("lite", {"search": {"learned": "both"}}).search_channels()
    assert gradients is None and isinstance(aliked, SearchFeatures) and aliked.name == "aliked"
    with pytest.raises(ValueError, match="search.learned"):
        Matcher("lite", {"search": {"learned": "sift"}}).search_channels()


def test_search_channels_reuse_the_keypoint_stage_dense_map(displaced, monkeypatch):
    """The keypoint stage hands ALIKED's dense map to the search channels: the same values as computing them anew,
    without running ALIKED again for that image; an image the keypoint stage did not see is computed."""
    import promptmid.models.dense_features as dense_features
    from promptmid.api import Matcher
    from promptmid.models.dense_features import SearchFeatures

    matcher = Matcher("lite")
    channels = matcher.search_channels()[1]
    assert matcher.describer.extractor.dense_tap == channels.remember
    opt, sar = _prepared(displaced)
    fresh = SearchFeatures(channels.net, projection=channels.projection)(opt)
    matcher.describer.features(opt)  # the keypoint stage, on the optical image only
    calls, real = [], dense_features.aliked_dense_map
    monkeypatch.setattr(dense_features, "aliked_dense_map", lambda *a: calls.append(1) or real(*a))
    assert np.array_equal(channels(opt), fresh) and not calls
    channels(sar)
    assert len(calls) == 1


def test_both_searches_pool_their_hypotheses(displaced, monkeypatch):
    """search.learned = 'both': the classical search and the search with ALIKED channels both run (the real search,
    its calls recorded) and their hypotheses are weighed together; the pick registers the displaced pair."""
    import promptmid.api as api

    calls, real = [], api.pooled_search

    def recorded(*args, **kwargs):
        hyps = real(*args, **kwargs)
        calls.append(([c is None for c in args[4]], [h.source for h in hyps]))
        return hyps

    monkeypatch.setattr(api, "pooled_search", recorded)
    r = api.Matcher("xfeat", {"search": {"learned": "both", "skip_when_ok": False, "top_k": 1}}).match(
        displaced.optical, displaced.sar)
    assert calls == [([True, False], ["area", "area+aliked"])]
    assert mean_corner_error(r.transform, displaced.H, (SIZE, SIZE)) < 2.0


def test_learned_channels_of_any_size_reach_every_level(displaced):
    """Learned channels of another size than the image (and more than OpenCV's 4 per resize) are reduced to each
    level and warped with the canvases."""
    from promptmid.search_levels import canvas_of

    opt, _ = _prepared(displaced)
    learned = np.random.default_rng(0).random((301, 257, 16), dtype=np.float32)
    level = make_level(opt, 111, 1.0, 9, learned=learned)
    assert level.learned.shape == (*level.mask.shape, 16) and level.features.shape[0] == 9 + 16
    canvas = canvas_of(level, 7.0, 1.1, {"sigma": 1.0, "orientations": 9})
    assert canvas.features.shape == (25, *canvas.mask.shape)


def test_pick_prefers_a_transform_two_kinds_of_source_agree_on():
    """The pick adds AGREEMENT_BONUS to a candidate confirmed (within SAME_PX) by another kind of source — the other
    search or the keypoints — not by its own search; a confirmed failed candidate can win, but stays at most
    uncertain, only when the keypoints confirm it or its mutual-information peak reaches MI_CONFIRM (two searches on
    shared gradient channels agree on the same wrong transform of a featureless image)."""
    from promptmid.geometry import translation
    from promptmid.qc import Verdict
    from promptmid.selection import MI_CONFIRM, Candidate, HandRule
    from promptmid.selection import pick as pick_by

    def cand(source, dx, status, conf, mi=0.0):
        return Candidate(source, translation(dx, 0.0), None, {"mi_peak": mi}, Verdict(status, conf))

    def pick(candidates, size):  # the rules around the score, with the hand-set score
        return pick_by(candidates, size, HandRule())

    lone = cand("area 1", 40.0, "uncertain", 0.3)
    a, b = cand("area 2", 0.0, "uncertain", 0.1), cand("area+aliked 3", 2.0, "failed", 0.02)
    assert pick([lone, a, b], (256, 256)) is a
    same = cand("area 3", 2.0, "uncertain", 0.1)  # the same search twice is no confirmation
    assert pick([lone, a, same], (256, 256)) is lone
    agreed = cand("area 2", 0.0, "failed", 0.03, MI_CONFIRM)
    best = pick([lone, agreed, cand("area+aliked 3", 2.0, "failed", 0.02, MI_CONFIRM)], (256, 256))
    assert best.transform is agreed.transform
    assert best.verdict.status == "uncertain" and "confirmed" in best.verdict.reasons[0]
    # the two searches agreeing without a mutual-information peak: nothing rescues a failed candidate
    assert pick([lone, cand("area 2", 0.0, "failed", 0.03), b], (256, 256)) is lone
    flat = pick([cand("area 1", 40.0, "failed", 0.01), cand("area 2", 0.0, "failed", 0.03), b], (256, 256))
    assert flat.verdict.status == "failed"
    # confirmed by the keypoints: rescued without the mutual information; the keypoint fit is kept (the same
    # transform, at least as confident) and is uncertain too
    kp = cand("keypoints", 1.0, "failed", 0.04)
    best = pick([kp, lone, cand("area 2", 0.0, "failed", 0.03)], (256, 256))
    assert best.transform is kp.transform and best.verdict.status == "uncertain"
    # ... but a more confident winner on the same transform stays, with its own verdict
    ok = cand("area 2", 0.0, "ok", 0.93, 3.4)
    assert pick([cand("keypoints", 1.5, "uncertain", 0.69, 2.4), ok], (256, 256)) is ok


def test_agreement_is_recorded_in_the_evidence():
    """record_agreement: another kind of source within SAME_PX sets agreement; agreement_keypoints only when the
    keypoints are one of the two; the same search twice is no agreement."""
    from promptmid.geometry import translation
    from promptmid.qc import Verdict
    from promptmid.selection import Candidate, record_agreement

    def cand(source, dx):
        return Candidate(source, translation(dx, 0.0), None, {}, Verdict("uncertain", 0.5))

    cands = [cand("keypoints", 1.0), cand("area 1", 0.0), cand("area 2", 40.0), cand("area 3", 41.0),
             cand("area+aliked 4", 40.5)]
    record_agreement(cands, (256, 256))
    got = [(c.evidence["agreement"], c.evidence["agreement_keypoints"]) for c in cands]
    assert got == [(1.0, 1.0), (1.0, 1.0), (1.0, 0.0), (1.0, 0.0), (1.0, 0.0)]
    alone = [cand("area 1", 0.0), cand("area 2", 1.0)]
    record_agreement(alone, (256, 256))
    assert [c.evidence["agreement"] for c in alone] == [0.0, 0.0]


def test_evaluation_keeps_the_first_top_k_hypotheses_of_each_search():
    """Cached search outputs made with a larger top_k are cut per search, order kept (kept_hypotheses)."""
    from promptmid.evaluation.area import kept_hypotheses
    from promptmid.search import Hypothesis

    hyps = [Hypothesis(np.eye(3), s, source=src) for s, src in
            [(0.9, "area"), (0.8, "area"), (0.7, "area"), (0.6, "area+aliked-trained"), (0.5, "area+aliked-trained"),
             (0.4, "area+aliked-trained")]]
    kept = kept_hypotheses(hyps, 2)
    assert [(h.source, h.score) for h in kept] == [("area", 0.9), ("area", 0.8), ("area+aliked-trained", 0.6),
                                                   ("area+aliked-trained", 0.5)]
    assert kept_hypotheses(hyps, 3) == hyps


def test_top_k_cuts_the_polished_hypotheses_without_changing_them(displaced):
    """search.top_k keeps the first top_k of the same polished peaks (search.polished_peaks), so a smaller top_k
    gives a prefix of a larger one's hypotheses."""
    optical, sar = _prepared(displaced)
    three = global_search(optical, sar, {"top_k": 3})
    two = global_search(optical, sar, {"top_k": 2})
    assert len(two) == min(2, len(three))
    for a, b in zip(two, three):
        assert np.allclose(a.matrix, b.matrix) and a.score == b.score


def test_an_uncertain_result_the_keypoints_and_a_search_agree_on_says_so_last():
    """The agreement note is added (as the last reason) to an uncertain pick confirmed with the keypoints, not to one
    only the two searches agree on, and never changes the status."""
    from promptmid.geometry import translation
    from promptmid.qc import Verdict
    from promptmid.selection import AGREEMENT_NOTE, Candidate, HandRule, pick

    def cand(source, dx, conf):
        return Candidate(source, translation(dx, 0.0), None, {"mi_peak": 2.0}, Verdict("uncertain", conf, {}, ["weak"]))

    far = cand("area 1", 60.0, 0.2)
    best = pick([cand("keypoints", 1.0, 0.85), far, cand("area+aliked 2", 0.0, 0.5)], (256, 256), HandRule())
    assert best.verdict.status == "uncertain" and best.verdict.reasons == ["weak", AGREEMENT_NOTE]
    searches = pick([far, cand("area 2", 1.0, 0.9), cand("area+aliked 3", 0.0, 0.5)], (256, 256), HandRule())
    assert searches.verdict.reasons == ["weak"]


def test_an_uncertain_candidate_without_a_mutual_information_peak_is_failed():
    """Below MI_FLOOR the intensities depend on each other no more at the transform than beside it: an uncertain
    candidate becomes failed (reason first); ok, failed and candidates without the evidence (NaN) are left alone."""
    from promptmid.qc import Verdict
    from promptmid.selection import MI_FLOOR, Candidate, without_mi_peak_failed

    def cand(status, mi):
        return Candidate("area 1", np.eye(3), None, {"mi_peak": mi}, Verdict(status, 0.3, {}, ["weak"]))

    low = without_mi_peak_failed(cand("uncertain", MI_FLOOR - 0.05))
    assert low.verdict.status == "failed" and "mutual-information" in low.verdict.reasons[0]
    assert low.verdict.reasons[1:] == ["weak"] and low.verdict.confidence == 0.3
    for status, mi in [("uncertain", MI_FLOOR + 0.05), ("uncertain", float("nan")), ("ok", -1.0), ("failed", 3.0)]:
        kept = cand(status, mi)
        assert without_mi_peak_failed(kept) is kept


def test_normalized_mutual_information_bounds():
    """NMI is 2 for one image a function of the other and about 1 for independent intensities."""
    from promptmid.alignment import normalized_mutual_information

    rng = np.random.default_rng(0)
    a = rng.integers(0, 32, 20000)
    assert normalized_mutual_information(a, (31 - a), 32) == pytest.approx(2.0)
    assert normalized_mutual_information(a, rng.integers(0, 32, 20000), 32) == pytest.approx(1.0, abs=0.02)
    assert math.isnan(normalized_mutual_information(a[:0], a[:0], 32))


def test_mutual_information_peaks_at_the_right_transform(displaced):
    """The intensities depend on each other most at the true transform: its MI peak stands out, and a transform
    20 px off (or a nodata-only SAR) gives none."""
    from promptmid.geometry import translation
    from promptmid.alignment import mutual_information_evidence

    opt, sar = _prepared(displaced)
    right = mutual_information_evidence(opt, sar, displaced.H)
    wrong = mutual_information_evidence(opt, sar, displaced.H @ translation(20.0, -20.0))
    assert right["mi_peak"] > 1.0 and right["mi_peak"] > 3 * max(wrong["mi_peak"], 0.0)
    blank = type(sar)(**{**sar.__dict__, "valid": np.zeros_like(sar.valid)})
    assert math.isnan(mutual_information_evidence(opt, blank, displaced.H)["mi_peak"])


def test_pick_weighs_the_mutual_information_peak():
    """Of two uncertain candidates, one whose MI peak is MI_WEIGHT-weighted above the other's confidence gap wins
    (the default score; the trained ranker also prefers a far higher MI peak); a failed candidate is not rescued by
    its MI peak alone."""
    from promptmid.geometry import translation
    from promptmid.qc import Verdict
    from promptmid.selection import MI_WEIGHT, Candidate, HandRule, ranker_named
    from promptmid.selection import pick as pick_by

    def pick(candidates, size):  # the default score
        return pick_by(candidates, size)

    def cand(source, dx, status, conf, mi):
        return Candidate(source, translation(dx, 0.0), None, {"mi_peak": mi}, Verdict(status, conf))

    kp = cand("keypoints", 30.0, "uncertain", 0.6, 0.2)
    area = cand("area 1", 0.0, "uncertain", 0.1, 0.2 + (0.5 + 0.1) / MI_WEIGHT)
    assert pick([kp, area], (256, 256)) is area
    assert pick([kp, cand("area 1", 0.0, "uncertain", 0.1, float("nan"))], (256, 256)) is kp
    assert pick([kp, cand("area 1", 0.0, "failed", 0.01, 10.0)], (256, 256)) is kp
    trained = ranker_named("trained")  # the trained ranker (an option) weighs it too
    assert pick_by([kp, cand("area 1", 0.0, "uncertain", 0.1, 4.0)], (256, 256), trained).source == "area 1"
    assert pick_by([kp, cand("area 1", 0.0, "failed", 0.01, 10.0)], (256, 256), trained) is kp
    assert isinstance(ranker_named("hand"), HandRule)
    with pytest.raises(ValueError, match="search.ranker"):
        ranker_named("oracle")
    from promptmid.api import Matcher

    assert isinstance(Matcher("xfeat").ranker, HandRule)
    assert Matcher("xfeat", {"search": {"ranker": "trained"}}).ranker is trained
    with pytest.raises(ValueError, match="search.ranker"):
        Matcher("xfeat", {"search": {"ranker": "oracle"}})


def test_shipped_ranker_loads_verified_and_refuses_tampering(tmp_path, monkeypatch):
    """The trained ranker (search.ranker = "trained") ships with a pinned sha256 and the expected features; a
    modified file or other features are refused with a ModelError, never used."""
    import json

    from promptmid import ranker
    from promptmid.errors import ModelError

    ranker.load_pick_model.cache_clear()
    model = ranker.load_pick_model()
    assert model.features == ranker.PICK_FEATURES and ranker.PICK_MODEL_SHA256
    assert ranker.pick_model_status()[0]["ready"]
    data = json.loads(ranker.PICK_MODEL.read_text())
    tampered = tmp_path / "pick.json"
    tampered.write_text(json.dumps({**data, "intercept": data["intercept"] + 1.0}))
    monkeypatch.setattr(ranker, "PICK_MODEL", tampered)
    ranker.load_pick_model.cache_clear()
    with pytest.raises(ModelError, match="sha256"):
        ranker.load_pick_model()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**data, "features": data["features"][::-1]}))
    with pytest.raises(ModelError, match="features"):
        ranker.load_pick_model(str(other))
    ranker.load_pick_model.cache_clear()
