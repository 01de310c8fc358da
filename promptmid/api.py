"""Python entry points: :class:`Matcher` and :class:`MatchResult`.

>>> m = Matcher(preset="lite")
>>> r = m.match("optical.tif", "sar.tif")      # paths or [H, W(, C)] arrays
>>> r.transform                                 # 3x3, optical (x, y) px -> SAR (x, y) px

All coordinates in a :class:`MatchResult` are pixels of the ORIGINAL images (x = column,
y = row, pixel centres at integers, origin top-left); ``points0`` are optical, ``points1``
SAR, and ``transform`` maps optical pixels to SAR pixels.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import cv2
import numpy as np
from promptmid import __version__
from promptmid.config import SEARCH_CHANNEL_SETS, get_config
from promptmid.descriptor import Describer
from promptmid.models.base import PairContext
from promptmid.io import PreparedImage, load_image, rotate_prepared
from promptmid import qc, selection
from promptmid.geometry import apply_transform, residuals
from promptmid.matching import Geometry, match_and_fit, search_rotations
from promptmid.models.dense_features import search_features
from promptmid.search import MATCHER_KEYS, Hypothesis, LearnedFeatures, pooled_search


@dataclass
class MatchResult:
    """Matches, fitted transform and QC numbers of one optical/SAR pair.

    Attributes:
        status: the QC verdict (:mod:`promptmid.qc`): ``"ok"`` (trust it), ``"uncertain"`` (a transform exists,
            check it; ``reason`` says why) or ``"failed"`` (then ``transform`` is ``None`` and ``reason`` says why).
        transform: 3x3 optical -> SAR pixel transform (original resolutions).
        confidence: calibrated probability in [0, 1] that ``transform`` is within 5 px (0 without one).
        qc: the verdict with every piece of evidence (:meth:`promptmid.qc.Verdict.to_dict`).
        points0: ``[K, 2]`` matched optical keypoints (px).
        points1: ``[K, 2]`` matched SAR keypoints (px).
        scores: ``[K]`` descriptor similarities of the matches.
        inliers: ``[K]`` bool, inliers of the robust fit.
        rmse: residual RMSE of inliers (SAR px).
        rotation_deg: SAR rotation (search step) that gave the kept fit.
        refinement: what the area-based refinement did (``None`` when off or the fit failed);
            ``transform`` is the refined one when ``refinement["applied"]`` (a refinement that disagrees with
            the keypoint evidence is not applied, and ``refinement["reason"]`` says why).
        num_keypoints: keypoints detected per image ``(optical, SAR)``.
        timings: seconds per stage.
        pair_context: what the feature sources decided for this pair (land-use class and scores,
            prompt per modality; empty without a prompted source).
        input_notes: what was done to the inputs that a user should know (e.g. complex SAR used as amplitude).
        sar_scaling: the SAR radiometric scaling actually applied (what ``--sar-scale auto`` resolved to).
        bands: the bands of each file the models saw, and why (``{"optical": ..., "sar": ...}``, see
            :class:`promptmid.io.BandChoice`).
        hypothesis: where ``transform`` came from: ``"keypoints"`` (the robust fit of the matches) or
            ``"area <i>"`` (the i-th hypothesis of the global area-based search, :mod:`promptmid.search`);
            ``inliers`` and ``rmse`` are then the matches that agree with it.
        hypotheses: every candidate the QC stage weighed (source, status, confidence, refined, transform).
    """

    status: str
    transform: np.ndarray | None
    points0: np.ndarray
    points1: np.ndarray
    scores: np.ndarray
    inliers: np.ndarray
    model: str
    rmse: float = float("nan")
    reason: str = ""
    confidence: float = 0.0
    qc: dict[str, Any] = field(default_factory=dict)
    rotation_deg: float = 0.0
    num_keypoints: tuple[int, int] = (0, 0)
    image_sizes: dict[str, list[int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    rotation_scores: dict[str, int] = field(default_factory=dict)
    refinement: dict[str, Any] | None = None
    pair_context: dict[str, Any] = field(default_factory=dict)
    input_notes: list[str] = field(default_factory=list)
    sar_scaling: str | None = None
    bands: dict[str, Any] = field(default_factory=dict)
    hypothesis: str | None = None
    hypotheses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The verdict is ``ok``: the transform can be trusted."""
        return self.status == "ok"

    @property
    def has_transform(self) -> bool:
        """A transform was fitted (status ``ok`` or ``uncertain``)."""
        return self.transform is not None

    @property
    def num_inliers(self) -> int:
        return int(self.inliers.sum())

    def coverage(self) -> float:
        """Fraction of the optical image covered by the convex hull of the inliers (0-1)."""
        pts = self.points0[self.inliers].astype(np.float32)
        if len(pts) < 3 or "optical" not in self.image_sizes:
            return 0.0
        w, h = self.image_sizes["optical"]
        return float(cv2.contourArea(cv2.convexHull(pts)) / (w * h))

    def fit(self, optical: Any, sar: Any) -> Any:
        """The :class:`promptmid.fit.Fit` record of this result on the grids ``optical`` and ``sar``
        (:class:`promptmid.geo.Grid`, e.g. ``Grid.of(prepared.raster)``)."""
        from promptmid.fit import Fit

        return Fit("match", self.status, self.transform, None, optical, sar, self.confidence, self.reason,
                   dict(self.qc.get("evidence") or {}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-match arrays; see ``tiepoints.csv``)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("points0", "points1", "scores", "inliers")}
        d["transform"] = None if self.transform is None else np.asarray(self.transform).tolist()
        d["transform_convention"] = "optical (x, y) px -> SAR (x, y) px; pixel centres at integers, origin top-left"
        d["matches"] = int(len(self.points0))
        d["inliers"] = self.num_inliers
        d["inlier_ratio"] = self.num_inliers / max(1, len(self.points0))
        d["inlier_coverage"] = self.coverage()
        d["rmse"] = None if not np.isfinite(self.rmse) else self.rmse
        d["promptmid_version"] = __version__
        return d


class Matcher:
    """Describe, match and fit one optical/SAR pair with a named preset.

    Args:
        preset: ``"lite"`` (default), ``"lite-concat"``, ``"aliked"``, ``"xfeat"`` or ``"full"`` (see :mod:`promptmid.config`).
        overrides: nested config overrides, e.g. ``{"geometry": {"model": "homography"}}``.
    """

    def __init__(self, preset: str = "lite", overrides: dict[str, Any] | None = None) -> None:
        self.preset = preset
        self.conf = get_config(preset, overrides)
        if not self.conf["geometry"]["rotations"]:
            raise ValueError("geometry.rotations must list at least one angle (e.g. [0])")
        self.describer = Describer(self.conf["keypoints"], self.conf["sources"], self.conf["aggregator"])
        self._search_features: LearnedFeatures | None = None
        self._dense: Any = None  # the coarse dense matcher (search.dense), loaded on first use
        self.ranker = selection.ranker_named(self.conf["search"].get("ranker", "hand"))  # the pick's score
        if (self.conf["search"].get("enabled") and self.conf["search"].get("learned")
                and self.describer.extractor.local_name == "aliked"):
            self.search_channels()  # built now (sharing ALIKED), so the keypoint stage hands it its dense maps

    def prepare(self, source: Any, modality: str) -> PreparedImage:
        """Read and scale one image with this matcher's I/O settings."""
        return load_image(source, modality, **self.conf["io"])  # type: ignore[arg-type]

    def match(
        self, optical: Any, sar: Any, progress: Callable[[str], None] | None = None,
        prior: np.ndarray | None = None, search: dict[str, Any] | bool | None = None,
    ) -> MatchResult:
        """Register ``sar`` to ``optical`` (paths, arrays or :class:`PreparedImage`).

        Args:
            prior: 3x3 ORIGINAL optical px -> SAR px transform known beforehand (e.g. a scene tile's position in its
                SAR chip): the area search runs relative to it (:func:`promptmid.search.pooled_search`).
            search: overrides of the ``search`` config for this call (e.g. narrow ranges around a ``prior``), or
                ``False`` to skip the area search for this call.

        Returns:
            :class:`MatchResult`; ``status == "failed"`` (no transform) when too few matches.
        """
        t_start = time.perf_counter()
        opt = optical if isinstance(optical, PreparedImage) else self.prepare(optical, "optical")
        sar_img = sar if isinstance(sar, PreparedImage) else self.prepare(sar, "sar")
        timings = {"read": time.perf_counter() - t_start}
        _progress(progress, "describing optical image")
        context = self.describer.begin_pair(opt)  # per pair, never stored: the Matcher is re-entrant
        feats0 = self.describer(opt, context)
        _add_timings(timings, feats0["timings"])

        def match_at(angle: float) -> tuple[Geometry, dict[str, Any], float]:
            _progress(progress, f"describing SAR image (rotation {angle:g} deg)")
            return self._match_rotation(feats0, opt, sar_img, angle, timings, context)

        _, best, rotation_scores = search_rotations(self.conf["geometry"]["rotations"], match_at,
                                                    lambda trial: trial[0].num_inliers)
        geom, data = best[0], best[1]
        refine_conf = self.refine_conf()
        _progress(progress, "quality control")
        with _timer(timings, "qc"):
            keypoint = selection.keypoint_candidate(opt, sar_img, data["points0"], data["points1"], data["scores"],
                                                    geom, refine_conf, self.conf["geometry"]["threshold"])
        hypotheses: list[Hypothesis] = []
        search_conf = self.search_conf(search)
        if search_conf is not None and not (search_conf.pop("skip_when_ok") and selection.settled(keypoint)):
            _progress(progress, "area-based search")
            with _timer(timings, "search"):
                hypotheses = pooled_search(opt, sar_img, search_conf, prior, self.search_channels())
                hypotheses += self.dense_hypotheses(opt, sar_img)
            _progress(progress, "quality control of the area hypotheses")
        with _timer(timings, "qc"):
            checked = selection.choose(opt, sar_img, keypoint, hypotheses, refine_conf, geom.model,
                                       ranker=self.ranker)
        timings["total"] = time.perf_counter() - t_start
        return self._result(best, checked, opt, sar_img, feats0, timings, rotation_scores, context)

    def _match_rotation(
        self, feats0: dict[str, Any], opt: PreparedImage, sar: PreparedImage, angle: float, timings: dict[str, float],
        context: PairContext,
    ) -> tuple[Geometry, dict[str, Any], float]:
        rotated, to_sar = rotate_prepared(sar, angle)
        feats1 = self.describer(rotated, context)
        _add_timings(timings, feats1["timings"])
        # all keypoints in original pixels of the unrotated images
        k0 = opt.to_original(feats0["keypoints"].numpy())
        k1 = sar.to_original(apply_transform(to_sar, feats1["keypoints"].numpy()))
        cand = match_and_fit(feats0["descriptors"], feats1["descriptors"], k0, k1, self.conf["matching"],
                             self.conf["geometry"])
        _add_timings(timings, cand.timings)
        geom, matches, scores = cand.geometry, cand.matches, cand.scores
        data = {"points0": k0[matches[:, 0]], "points1": k1[matches[:, 1]], "scores": scores,
                "n1": len(feats1["keypoints"])}
        return geom, data, angle

    def search_conf(self, override: dict[str, Any] | bool | None = None) -> dict[str, Any] | None:
        """Options of :func:`promptmid.search.global_search` plus ``skip_when_ok``: the config's ``search`` section
        updated with ``override`` (one call's options); every rotation when the keypoint stage searches rotations too
        (``geometry.rotations`` lists more than one angle). ``None`` when the search is off (``search.enabled``, or
        ``override`` is ``False``)."""
        if override is False or not self.conf["search"]["enabled"]:
            return None
        conf = {k: v for k, v in self.conf["search"].items() if k not in MATCHER_KEYS}
        if len(self.conf["geometry"]["rotations"]) > 1:
            conf["rotation_range"] = 180.0
        return {**conf, "skip_when_ok": self.conf["search"]["skip_when_ok"], **(override or {})}

    def refine_conf(self) -> dict[str, Any] | None:
        """Options of the area-based refinement (:func:`promptmid.refine.refine_prepared`, ``polish``), ``None`` when
        ``refine.enabled`` is off."""
        conf = dict(self.conf["refine"])
        return conf if conf.pop("enabled") else None

    def dense_hypotheses(self, optical: PreparedImage, sar: PreparedImage) -> list[Hypothesis]:
        """The coarse dense matcher's hypothesis (``search.dense``: its weights file;
        :class:`promptmid.models.dense_matcher.DenseHypotheses`, loaded on first use) over the SAR turns of
        ``geometry.rotations``; ``[]`` when off."""
        if not self.conf["search"].get("dense"):
            return []
        if self._dense is None:
            from promptmid.models.dense_matcher import DenseHypotheses

            path = self.conf["search"]["dense"]
            if not isinstance(path, (str, os.PathLike)):
                raise ValueError(f"search.dense must be the path of a dense matcher weights file or None, got {path!r}")
            self._dense = DenseHypotheses(path)
        return self._dense(optical, sar, tuple(float(r) for r in self.conf["geometry"]["rotations"]))

    def search_channels(self) -> list[LearnedFeatures | None]:
        """The learned channels of each area search to run (``search.learned``, :data:`SEARCH_CHANNEL_SETS`;
        ``None``: gradients only), their hypotheses pooled in this order: ``[None]`` without learned channels,
        ``[aliked]``, or ``[None, aliked]`` for ``"both"`` / ``"both-trained"`` (the default). The learned channels are built once and share the keypoint
        stage's network."""
        name = self.conf["search"].get("learned")
        if not name:
            return [None]
        if name not in SEARCH_CHANNEL_SETS:
            raise ValueError(f"Unknown search.learned {name!r}; valid: {', '.join(SEARCH_CHANNEL_SETS)} or None")
        kinds = SEARCH_CHANNEL_SETS[name]
        if self._search_features is None:
            net = self.describer.extractor.net if self.describer.extractor.local_name == "aliked" else None
            self._search_features = search_features(next(k for k in kinds if k), net)
            if net is not None:
                self.describer.extractor.dense_tap = self._search_features.remember
        return [None if k is None else self._search_features for k in kinds]

    def _result(
        self, best: tuple[Geometry, dict[str, Any], float],
        checked: tuple[selection.Candidate | None, list[selection.Candidate]],
        opt: PreparedImage, sar: PreparedImage,
        feats0: dict[str, Any], timings: dict[str, float], rotation_scores: dict[str, int], context: PairContext,
    ) -> MatchResult:
        geom, data, angle = best
        chosen, candidates = checked
        if chosen is None:
            final, refinement, verdict = None, None, qc.no_transform(geom.reason)
        else:
            final, refinement, verdict = chosen.transform, chosen.refinement, chosen.verdict
        inliers, rmse = geom.inliers, geom.rmse
        if chosen is not None and chosen.source != "keypoints":  # the matches that agree with the area transform
            res = residuals(final, data["points0"], data["points1"])
            inliers = res <= self.conf["geometry"]["threshold"]
            rmse = float(np.sqrt(np.mean(res[inliers] ** 2))) if inliers.any() else float("nan")
        return MatchResult(
            status=verdict.status,
            transform=None if verdict.status == "failed" else final,
            confidence=verdict.confidence,
            qc={**verdict.to_dict(), **({"rejected_transform": np.asarray(final).tolist()}
                                       if final is not None and verdict.status == "failed" else {})},
            refinement=refinement,
            points0=data["points0"],
            points1=data["points1"],
            scores=data["scores"],
            inliers=inliers,
            model=geom.model,
            rmse=rmse,
            hypothesis=None if chosen is None else chosen.source,
            hypotheses=[c.summary() for c in candidates],
            reason="; ".join(verdict.reasons),
            rotation_deg=angle,
            num_keypoints=(len(feats0["keypoints"]), data["n1"]),
            image_sizes={"optical": list(opt.original_size), "sar": list(sar.original_size)},
            timings=timings,
            models=self.describer.info(),
            pair_context=context.to_dict(),
            input_notes=[f"{m}: {n}" for m, img in (("optical", opt), ("sar", sar)) for n in img.notes],
            sar_scaling=sar.sar_scaling,
            bands={m: img.bands.to_dict() for m, img in (("optical", opt), ("sar", sar)) if img.bands},
            config={"preset": self.preset, **self.conf},
            rotation_scores=rotation_scores,
        )


def _progress(callback: Callable[[str], None] | None, message: str) -> None:
    if callback is not None:
        callback(message)


@contextmanager
def _timer(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the elapsed seconds of the block to ``timings[key]``."""
    t0 = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def _add_timings(total: dict[str, float], new: dict[str, float]) -> None:
    for key, value in new.items():
        total[key] = total.get(key, 0.0) + value

