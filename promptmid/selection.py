"""One result per pair: the keypoint fit and the area-search hypotheses, each refined and judged, one kept.

The keypoint fit (:func:`assess`) and every hypothesis of the global area-based search
(:mod:`promptmid.search`) are refined and judged by the same QC model (:mod:`promptmid.qc`), and the most
confident is kept. An area hypothesis has no keypoint evidence and its dense correlation is the very quantity the
search maximised, so it is ``ok`` only when the refinement blocks around it agree on one correction.

Coordinates: ``points0`` optical, ``points1`` SAR, (x, y) pixels of the ORIGINAL images; every transform maps
optical pixels to SAR pixels.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from promptmid.config import INLIER_THRESHOLD_PX, SUCCESS_PX
from promptmid.geometry import corner_error
from promptmid.io import PreparedImage
from promptmid.matching import Geometry
from promptmid.alignment import dense_evidence, mutual_information_evidence
from promptmid.qc import (QCModel, Verdict, gather_evidence, judge, linear_plausibility, pixel_size_evidence,
                          refinement_agrees, verdict_of)
from promptmid.polish import polish_affine
from promptmid.refine import Refinement, refine_prepared
from promptmid.correlation import fft_workers
from promptmid.ranker import PICK_FEATURES


AREA_REFINE_SEARCH = 16  # search radius (working px) of the refinement of an area hypothesis (coarse: ~4 px at 256)


@dataclass
class Candidate:
    """One transform hypothesis after the QC stage.

    Attributes:
        source: ``"keypoints"`` (the robust fit of the matches) or ``"area <i>"`` (:mod:`promptmid.search`).
        transform: the kept 3x3 optical -> SAR transform (refined when the evidence preferred that).
        refinement: :meth:`Refinement.to_dict` (``applied`` says whether ``transform`` is the refined one).
        evidence: the QC evidence of ``transform``.
        verdict: its verdict.
        search_score: the area search's correlation (NaN for keypoints).
        pick_score: what the pick ranked it by (:func:`pick`; NaN when it was the only candidate).
    """

    source: str
    transform: np.ndarray
    refinement: dict[str, Any] | None
    evidence: dict[str, float]
    verdict: Verdict
    search_score: float = float("nan")
    pick_score: float = float("nan")

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "status": self.verdict.status,
                "confidence": round(self.verdict.confidence, 4),
                "refined": bool(self.refinement and self.refinement.get("applied")),
                "search_score": None if not math.isfinite(self.search_score) else round(self.search_score, 4),
                "mi_peak": round(mi_peak(self), 3) if "mi_peak" in self.evidence else None,
                "pick_score": None if not math.isfinite(self.pick_score) else round(self.pick_score, 4),
                "transform": np.asarray(self.transform).tolist()}


def assess(optical: PreparedImage, sar: PreparedImage, points0: np.ndarray, points1: np.ndarray, scores: np.ndarray,
           geom: Geometry, refine_conf: Mapping[str, Any] | None = None, threshold: float = INLIER_THRESHOLD_PX
           ) -> tuple[np.ndarray | None, dict[str, Any] | None, dict[str, float]]:
    """The QC stage before the verdict: refine (when ``refine_conf`` is given), accept the refinement only when
    it agrees with the keypoint evidence, and gather the evidence about the kept transform.

    Returns:
        ``(transform, refinement_info, evidence)``: ``transform`` is the refined matrix when the refinement was
        accepted, else the keypoint fit (``None`` when the fit failed); ``refinement_info`` is
        :meth:`Refinement.to_dict` with ``applied``/``reason`` saying why a refinement was rejected (``None``
        when it did not run); ``evidence`` is empty without a fit. Pass it to :func:`verdict_of`.
    """
    if not geom.ok:
        return None, None, {}
    # the keypoint fit is judged alone (the area hypotheses are judged side by side): its blocks use every thread
    refinement = (refine_prepared(optical, sar, geom.matrix, geom.model, workers=fft_workers(), **refine_conf)
                  if refine_conf else None)
    final, info = geom.matrix, None
    dense = dense_evidence(optical, sar, geom.matrix)
    if refinement is not None:
        info = refinement.to_dict()
        if refinement.applied:
            refined = dense_evidence(optical, sar, refinement.matrix)
            accepted, why = refinement_agrees(dense, refined)
            if accepted:
                final, dense = refinement.matrix, refined
            else:
                info.update(applied=False, reason=why)
    evidence = gather_evidence(optical, sar, points0, points1, scores, geom, refinement, threshold)
    return final, info, {**evidence, **dense}


def area_evidence(optical: PreparedImage, sar: PreparedImage, matrix: np.ndarray, hypothesis: np.ndarray,
                  refinement: Refinement | None) -> dict[str, float]:
    """The evidence of a transform that comes from the area search (no keypoints): its plausibility, the
    refinement blocks around the ``hypothesis`` and the dense correlation at ``matrix`` (the hypothesis or its
    refinement)."""
    ev = linear_plausibility(matrix)
    applied = refinement is not None and refinement.applied
    shift = corner_error(refinement.matrix, hypothesis, optical.original_size).mean() if applied else 0.0
    ev.update(refine_agreement=1.0, refine_inlier_ratio=refinement.inliers / max(refinement.blocks, 1) if applied
              else 0.0, refine_shift_px=float(shift), refine_blocks=float(refinement.blocks if refinement else 0))
    ev.update(pixel_size_evidence(optical, sar, ev["scale"]))
    ev.update(dense_evidence(optical, sar, matrix))
    return ev


def assess_area(optical: PreparedImage, sar: PreparedImage, hypothesis: np.ndarray, model: str,
                refine_conf: Mapping[str, Any] | None, source: str, search_score: float = float("nan"),
                qc_model: QCModel | None = None) -> Candidate:
    """Refine an area hypothesis and judge it. With ``refine_conf["polish"]``, the hypothesis (a similarity from a 256 px grid) is
    first aligned densely as an affine (:func:`promptmid.polish.polish_affine`); then the refinement blocks
    (first pass searches :data:`AREA_REFINE_SEARCH` px, the next ones the configured radius) run around it and
    are kept when the dense correlation agrees (:func:`refinement_agrees`, the rule of the keypoint fit).
    A hypothesis whose refinement blocks do not agree on a correction (or without refinement) is never ``ok``:
    nothing but the search's own correlation speaks for it (measured on perturbed validation and training 3MOS
    pairs, capping it this way registers 45/54 and 27/78 where calling it ``failed`` registers 44 and 24)."""
    refine_conf = dict(refine_conf) if refine_conf else None
    polish = bool(refine_conf.pop("polish", False)) if refine_conf else False
    start = np.asarray(hypothesis, float)
    polished = polish_affine(optical, sar, start).matrix if polish else start
    refinement = None
    if refine_conf:
        narrow = int(refine_conf.get("search", 8))
        conf = {**refine_conf, "search": max(narrow, AREA_REFINE_SEARCH), "search_after": narrow}
        refinement = refine_prepared(optical, sar, polished, model, **conf)
    # the evidence of an unrefined candidate is taken at the search's own hypothesis, as the QC model was
    # calibrated: the polish maximises the very correlation the dense evidence measures, so judging the polished
    # transform would make wrong hypotheses look better (a flat pair turned from failed to uncertain)
    matrix, info = polished, None
    ev = area_evidence(optical, sar, start, polished, refinement)
    if refinement is not None:
        info = refinement.to_dict()
        if refinement.applied:
            refined = area_evidence(optical, sar, refinement.matrix, polished, refinement)
            accepted, why = refinement_agrees(ev, refined)
            if accepted:
                matrix, ev = np.asarray(refinement.matrix, float), refined
            else:
                info.update(applied=False, reason=why)
    verdict = verdict_of(ev, qc_model)
    if refinement is None or not refinement.applied:
        # the dense evidence correlates the very features the search maximised: without refinement blocks that
        # agree on one correction there is no independent evidence for the hypothesis, so it is never "ok"
        status = "uncertain" if verdict.status == "ok" else verdict.status
        verdict = Verdict(status, verdict.confidence, verdict.evidence,
                          ["no consistent refinement blocks around the area hypothesis"] + verdict.reasons)
    return Candidate(source, matrix, info, ev, verdict, search_score)


SAME_PX = SUCCESS_PX  # candidates whose transforms differ by less than this (mean corner distance, px) are one


def keypoint_candidate(optical: PreparedImage, sar: PreparedImage, points0: np.ndarray, points1: np.ndarray,
                       scores: np.ndarray, geom: Geometry, refine_conf: Mapping[str, Any] | None = None,
                       threshold: float = INLIER_THRESHOLD_PX, qc_model: QCModel | None = None) -> Candidate | None:
    """The keypoint fit as a candidate: refined when the dense correlation agrees (:func:`assess`; the polish is for
    area hypotheses only) and judged; ``None`` when the fit failed."""
    if not geom.ok:
        return None
    keypoint_conf = {k: v for k, v in refine_conf.items() if k != "polish"} if refine_conf else None
    final, info, ev = assess(optical, sar, points0, points1, scores, geom, keypoint_conf, threshold)
    return Candidate("keypoints", np.asarray(final, float), info, ev, judge(ev, model=qc_model))


def settled(keypoint: Candidate | None) -> bool:
    """Whether the keypoint fit alone already is the answer: its verdict is ``ok``. The area search
    (``search.skip_when_ok``) is then skipped: on perturbed validation the QC pick equalled the keypoint fit, or a
    transform within :data:`SAME_PX` of it, on every pair whose keypoint fit was ``ok`` (18 of 27; same SR@5)."""
    return keypoint is not None and keypoint.verdict.status == "ok"


def choose(optical: PreparedImage, sar: PreparedImage, keypoint: Candidate | None, hypotheses: Sequence[Any] = (),
           refine_conf: Mapping[str, Any] | None = None, model: str = "affine", qc_model: QCModel | None = None,
           ranker: Any = None) -> tuple[Candidate | None, list[Candidate]]:
    """One result per pair, chosen by evidence: the keypoint fit (:func:`keypoint_candidate`, ``None`` when it failed)
    and every area hypothesis (:func:`assess_area`; objects with ``matrix`` and ``score``, e.g.
    :class:`promptmid.search.Hypothesis`; polished first when ``refine_conf["polish"]``; ``model``: the geometry of
    their refinement), each refined when the dense correlation agrees (an area hypothesis within :data:`SAME_PX` of
    the keypoint fit is not weighed again); :func:`pick` keeps one (the most confident, with a bonus for a transform
    two kinds of source agree on).

    Returns:
        ``(chosen, candidates)``; ``chosen`` is ``None`` when there is no candidate at all (keypoint fit failed
        and no hypothesis).
    """
    candidates: list[Candidate] = [keypoint] if keypoint is not None else []
    todo = [(i, h) for i, h in enumerate(hypotheses, 1)  # the keypoint fit already is a hypothesis within SAME_PX
            if not (candidates and corner_error(candidates[0].transform, h.matrix, optical.original_size).mean() <= SAME_PX)]

    def judge_area(item: tuple[int, Any]) -> Candidate:
        i, h = item
        return assess_area(optical, sar, h.matrix, model, refine_conf, f"{getattr(h, 'source', 'area')} {i}", h.score,
                           qc_model)

    # OpenCV releases the GIL while it matches blocks: the hypotheses are judged side by side (same results)
    with ThreadPoolExecutor(max(1, min(len(todo), fft_workers()))) as pool:
        candidates.extend(pool.map(judge_area, todo))
    if not candidates:
        return None, []
    if len(candidates) > 1:  # the pick weighs the mutual information; one candidate needs no comparison
        for c in candidates:
            c.evidence.update(mutual_information_evidence(optical, sar, c.transform))
        candidates = [without_mi_peak_failed(c) for c in candidates]
        record_agreement(candidates, optical.original_size)
    return pick(candidates, optical.original_size, ranker), candidates


def record_agreement(candidates: Sequence[Candidate], size: tuple[int, int]) -> None:
    """Add to each candidate's evidence ``agreement`` (1 when another kind of source proposes a transform within
    :data:`SAME_PX` of it, :func:`confirmations`) and ``agreement_keypoints`` (1 when the keypoints are one of the
    two, :func:`with_keypoints`); absent for a lone candidate."""
    for c, by in zip(candidates, confirmations(candidates, size)):
        c.evidence.update(agreement=float(bool(by)), agreement_keypoints=float(with_keypoints(c, by)))


MI_FLOOR = 0.2  # an uncertain candidate whose mutual-information peak is below this is failed (without_mi_peak_failed)


def without_mi_peak_failed(candidate: Candidate) -> Candidate:
    """``candidate``, ``failed`` when it is ``uncertain`` and its mutual-information peak (``evidence["mi_peak"]``) is
    below :data:`MI_FLOOR`: the optical and the warped SAR intensities depend on each other no more at the transform
    than at shifted copies of it (noise: peaks of -0.2 to 0.1). On the training 3MOS tiles (two displacement seeds,
    the default's candidates of the 62 pairs the pick decides) 139 of 318 wrong candidates and 3 of the 70 right ones
    are below it, and the pick chose none of those three (its choices are the same with floors from 0 to 0.3); on a
    noise image against a SAR image the trained search's best hypothesis (peak 0.02) was ``uncertain`` without it.
    An ``ok`` verdict is left to the QC model."""
    value = candidate.evidence.get("mi_peak", float("nan"))
    if candidate.verdict.status != "uncertain" or not math.isfinite(value) or value >= MI_FLOOR:
        return candidate
    v = candidate.verdict
    why = f"no mutual-information peak ({value:.2f} < {MI_FLOOR:g}): the images depend on each other no more here"
    return replace(candidate, verdict=Verdict("failed", v.confidence, v.evidence, [why, *v.reasons]))


AGREEMENT_BONUS = 0.5  # HandRule: added to the confidence of a candidate that another kind of source confirms
MI_WEIGHT = 0.5  # HandRule: per thousandth of mutual-information peak (alignment.mutual_information_evidence)
MI_CONFIRM = 1.0  # least MI peak (thousandths) for the two searches' agreement to rescue a failed candidate
# the last reason of an uncertain result the keypoints and the area search agree on: evidence for it, not a verdict
# (made ok by it, on the displaced unseen pairs 1 of 2 was within 5 px: docs/results.md)
AGREEMENT_NOTE = (f"in its favour: the keypoint fit and an area hypothesis found it independently (within {SAME_PX:g} "
                  "px); 12 of 13 such uncertain results were right on the QC calibration runs")


def mi_peak(candidate: Candidate) -> float:
    """The candidate's mutual-information peak (``evidence["mi_peak"]``, thousandths; 0 when absent or NaN)."""
    value = candidate.evidence.get("mi_peak", float("nan"))
    return value if math.isfinite(value) else 0.0


def origin(candidate: Candidate) -> str:
    """What proposed a candidate: ``"keypoints"``, ``"area"``, ``"area+<name>"`` or ``"dense"`` (its source without
    the hypothesis index)."""
    head, _, index = candidate.source.rpartition(" ")
    return head if head and index.isdigit() else candidate.source


def confirmations(candidates: Sequence[Candidate], size: tuple[int, int]) -> list[set[str]]:
    """For each candidate, the other kinds of source (:func:`origin`) that propose a transform within
    :data:`SAME_PX` of it (mean corner distance over the optical image of ``size``)."""
    return [{origin(d) for d in candidates if origin(d) != origin(c)
             and corner_error(c.transform, d.transform, size).mean() <= SAME_PX} for c in candidates]


def with_keypoints(candidate: Candidate, confirmed_by: set[str]) -> bool:
    """Confirmed (``confirmed_by``: :func:`confirmations`) with the keypoints as one of the two sources."""
    return bool(confirmed_by) and "keypoints" in confirmed_by | {origin(candidate)}


def pick_features(candidates: Sequence[Candidate], size: tuple[int, int],
                  confirmed: list[set[str]] | None = None) -> np.ndarray:
    """``[n, F]`` inputs of the pick's ranker (:data:`promptmid.ranker.PICK_FEATURES`, in that order): the log QC
    confidence, the mutual-information peak, whether another kind of source confirms the transform (and whether the
    keypoints are one of the two), whether it is the keypoint fit, its verdict (failed / ok, before any rescue), and
    its dense and refinement evidence (missing or non-finite: 0; the dense offset capped at 50 px). ``confirmed``:
    :func:`confirmations` of the candidates when the caller has them already."""

    def num(c: Candidate, key: str, default: float = 0.0) -> float:
        value = c.evidence.get(key, default)
        return float(value) if value is not None and math.isfinite(value) else default

    rows = []
    for c, by in zip(candidates, confirmed if confirmed is not None else confirmations(candidates, size)):
        rows.append([math.log(c.verdict.confidence + 1e-3), mi_peak(c), float(bool(by)),
                     float(with_keypoints(c, by)), float(origin(c) == "keypoints"),
                     float(c.verdict.status == "failed"), float(c.verdict.status == "ok"), num(c, "dense_peak"),
                     num(c, "dense_distinctness"), num(c, "refine_inlier_ratio"),
                     min(num(c, "dense_offset_px", 50.0), 50.0)])
    return np.array(rows, float).reshape(len(rows), len(PICK_FEATURES))


RANKERS = ("hand", "trained")  # search.ranker: the pick's score


def ranker_named(name: str) -> Any:
    """The pick's scorer for ``search.ranker``: ``"hand"`` (:class:`HandRule`, the default) or ``"trained"``
    (:func:`promptmid.ranker.load_pick_model`, checksum verified).

    Raises:
        ValueError: another name. ModelError: the trained ranker is missing or fails its checksum.
    """
    if name == "hand":
        return HandRule()
    if name == "trained":
        from promptmid.ranker import load_pick_model

        return load_pick_model()
    raise ValueError(f"Unknown search.ranker {name!r}; valid: {', '.join(RANKERS)}")


class HandRule:
    """The pick's default score: the QC confidence, plus :data:`AGREEMENT_BONUS` when another kind of source confirms
    the transform, plus :data:`MI_WEIGHT` per thousandth of mutual-information peak (chosen on the training 3MOS
    tiles: both searches 20 -> 22 of 39 at seed 0, 17 -> 22 at seed 1; validation 25 -> 25)."""

    def score(self, x: np.ndarray) -> np.ndarray:
        conf, mi, confirmed = np.exp(x[:, 0]) - 1e-3, x[:, 1], x[:, 2]
        return conf + AGREEMENT_BONUS * confirmed + MI_WEIGHT * mi


def pick(candidates: Sequence[Candidate], size: tuple[int, int], ranker: Any = None) -> Candidate:
    """The candidate kept: the one the ranker scores highest among those that are not ``failed`` (a failed one only
    when all are failed or when agreement rescues it, below).

    The ranker is any object with ``score([n, F] pick_features) -> [n]``: :class:`HandRule` by default (confidence +
    agreement bonus + mutual information: the QC confidence of an area hypothesis is capped low when its refinement
    blocks do not agree, usual on 10 m SAR, so confidences alone do not rank a right area hypothesis above a wrong
    keypoint fit; the intensities' dependence peaking at the transform does, independently of the gradient
    channels), or the trained logistic ranker (:mod:`promptmid.ranker`, ``search.ranker = "trained"``): on the
    training 3MOS tiles it won a 5-fold cross-validation grouped by tile (17 + 17 against 16 + 15 of the 31 + 31
    pairs the pick decides), tied validation (7 of 9) and lost one of the 148 displaced unseen pairs (an osmnet
    pair), so it is an option, not the default.

    A candidate confirmed by another kind of source (:func:`confirmations`: keypoints, the classical search or the
    search with learned channels, within :data:`SAME_PX`) is not ruled out as failed (it is at most ``uncertain``)
    when the keypoints are one of the two, or when its mutual-information peak reaches :data:`MI_CONFIRM`: the two
    searches share the gradient channels, and on a featureless optical image (noise) both found the same wrong
    transform, with no mutual-information peak (about 0). When the keypoint fit is the same transform as the winner
    (within :data:`SAME_PX`) and at least as confident, it is kept instead: confidences of right transforms saturate
    near 1, and the keypoint fit starts closer to the truth than a coarse area hypothesis; a more confident winner
    stays (training 3MOS tiles, seed 1: an ``uncertain`` keypoint fit 5.6 px off had replaced the same transform
    refined from an area hypothesis, ``ok`` and 4.0 px off).

    Args:
        candidates: judged candidates, the keypoint fit (if any) first.
        size: (width, height) of the optical image (original px), for the corner distances.
        ranker: the scorer (``None``: :class:`HandRule`).
    """
    confirmed = confirmations(candidates, size)
    rescued = [with_keypoints(c, by) or (bool(by) and mi_peak(c) >= MI_CONFIRM) for c, by in zip(candidates, confirmed)]
    ranker = ranker if ranker is not None else HandRule()
    scores = [0.0]  # one candidate needs no score
    if len(candidates) > 1:
        scores = ranker.score(pick_features(candidates, size, confirmed))
        for c, s in zip(candidates, scores):
            c.pick_score = float(s)

    def key(i: int) -> tuple[bool, float]:
        return candidates[i].verdict.status != "failed" or rescued[i], float(scores[i])

    i = max(range(len(candidates)), key=key)
    first = candidates[0]
    if (i and first.source == "keypoints" and first.verdict.confidence >= candidates[i].verdict.confidence
            and corner_error(first.transform, candidates[i].transform, size).mean() <= SAME_PX):
        i = 0
    best = candidates[i]
    if rescued[i] and best.verdict.status == "failed":  # agreement is evidence: at most uncertain, never ok
        v = best.verdict
        why = f"confirmed by another kind of hypothesis within {SAME_PX:g} px, but the QC evidence alone says failed"
        best = replace(best, verdict=Verdict("uncertain", v.confidence, v.evidence, [why] + v.reasons))
    if candidates[i].verdict.status == "uncertain" and with_keypoints(best, confirmed[i]):  # not a rescued failure
        v = best.verdict
        best = replace(best, verdict=Verdict("uncertain", v.confidence, v.evidence, v.reasons + [AGREEMENT_NOTE]))
    return best
