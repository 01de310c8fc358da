"""Do the tiles of a scene agree? Per-tile fits checked against the prior, against each other and against the
global model (self-contained; the per-tile results stay on the :class:`~promptmid.scene.grid.Tile` objects so a
verdict can be attached to each later).

All distances are in SAR-grid pixels; every transform maps optical scene px -> SAR-grid px.

* **prior departure**: a tile is matched against a SAR chip that extends ``search radius`` px around the prior, so a
  correct tile fit can differ from the prior by at most about the radius over the tile. A tile whose fit departs
  further (max over its corners) is ``rejected``: its matches cannot be right. With a georeferenced prior, a tile
  fit whose scale / shear / rotation differ from the prior's by more than ``max_distortion`` is rejected too (this
  is what keeps a 13 px georeferencing error from becoming a 43 px answer with a 13 % scale).
* **consensus**: each fitted tile's transform is a hypothesis; the one that most other tiles agree with (RMS
  distance over each tile's 3x3 grid <= ``agree_px``; ties broken by inlier count) defines the tiles whose tie
  points the global model is fitted on.
* **disagreement**: each fitted tile's RMS distance to the final global model; the scene agrees when more than
  half of the fitted tiles are within ``agree_px`` and the model itself stays within the search radius of the
  prior over those tiles.
* **verdict** (:func:`scene_verdict`): ``ok`` only when the tiles agree AND at least one agreeing tile's own keypoint
  fit has the QC verdict ``ok`` (:mod:`promptmid.qc`); tiles that agree without such a fit (area shifts, uncertain
  fits) give ``uncertain``; no model gives ``failed``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from promptmid import geo
from promptmid.geometry import apply_transform
from promptmid.scene.grid import Tile, spans
from promptmid.scene.model import GlobalModel, fit_global

if TYPE_CHECKING:
    from promptmid.scene.products import TiePoints

Mapping = Callable[[np.ndarray], np.ndarray]  # [N, 2] optical px -> [N, 2] SAR px


def distance_rms(a: Mapping, b: Mapping, points: np.ndarray) -> float:
    """RMS distance (px) between two mappings over ``points``."""
    return float(np.sqrt(np.mean(np.sum((a(points) - b(points)) ** 2, axis=1))))


def distance_max(a: Mapping, b: Mapping, points: np.ndarray) -> float:
    """Largest distance (px) between two mappings over ``points``."""
    return float(np.max(np.linalg.norm(a(points) - b(points), axis=1)))


def as_mapping(matrix: np.ndarray) -> Mapping:
    """A 3x3 transform as a point mapping."""
    return lambda p: apply_transform(matrix, p)


def fitted(tiles: list[Tile]) -> list[Tile]:
    """Tiles with their own accepted fit."""
    return [t for t in tiles if t.status == "ok" and t.transform is not None]


def distortion(matrix: np.ndarray, prior: np.ndarray) -> float:
    """How far the linear part of ``matrix`` is from the prior's: spectral norm of ``A - I`` where ``A`` is the
    linear part of ``inv(prior) @ matrix`` (0.05 = 5 % scale, or shear, or ~2.9 degrees of rotation)."""
    a = (np.linalg.inv(prior) @ np.asarray(matrix, np.float64))[:2, :2]
    return float(np.linalg.norm(a - np.eye(2), 2))


def reject_beyond_prior(tiles: list[Tile], prior: np.ndarray, limit_px: float,
                        max_distortion: float | None = None, min_px: float = 6.0) -> None:
    """Record each fitted tile's departure from the prior; reject those beyond ``limit_px`` and, with
    ``max_distortion`` (georeferenced priors: the georeferencing fixes scale and orientation, its errors are
    shifts), those whose scale / shear / rotation differ from the prior's by more than that AND by more than
    ``min_px`` at the tile's edge (a few px of noise on a small tile is no evidence) (in place)."""
    for t in fitted(tiles):
        t.prior_departure_px = distance_max(as_mapping(t.matrix), as_mapping(prior), t.grid_points(2))
        bend = distortion(t.matrix, prior)
        bend = bend if bend * max(t.w, t.h) / 2 > min_px else 0.0
        if t.prior_departure_px > limit_px:
            t.status = "rejected"
            t.reason = (f"tile fit departs {t.prior_departure_px:.1f} px from the prior, beyond the search radius "
                        f"({limit_px:.1f} px): its matches cannot be right")
        elif max_distortion is not None and bend > max_distortion:
            t.status = "rejected"
            t.reason = (f"tile fit scales / shears / rotates {100 * bend:.1f} % against the georeferencing (at most "
                        f"{100 * max_distortion:g} %)")


def consensus(tiles: list[Tile], agree_px: float) -> list[Tile]:
    """The largest set of fitted tiles agreeing with one tile's fit (ties: most inliers); ``[]`` if none."""
    best: list[Tile] = []
    for hyp in fitted(tiles):
        m = as_mapping(hyp.matrix)
        group = [t for t in fitted(tiles) if distance_rms(m, as_mapping(t.matrix), t.grid_points()) <= agree_px]
        key = (len(group), sum(t.inliers for t in group))
        if key > (len(best), sum(t.inliers for t in best)):
            best = group
    return best


@dataclass
class Agreement:
    """How well the tiles of a scene agree (``result.json`` key ``agreement``).

    Attributes:
        agree_px: largest RMS distance (SAR px) between a tile's fit and the global model for the tile to agree.
        prior_limit_px: largest departure from the prior that a fit may show (search radius + inlier threshold).
        fitted: tiles with their own fit (after the prior check); agreeing: indices of those that agree.
        rejected_by_prior: indices of tiles the prior check rejected (departure beyond ``prior_limit_px`` or, with
            a georeferenced prior, too much scale / shear / rotation against it).
        model_prior_departure_px: largest distance between the global model and the prior over the agreeing tiles.
    """

    agree_px: float
    prior_limit_px: float
    fitted: int = 0
    agreeing: list[int] = field(default_factory=list)
    rejected_by_prior: list[int] = field(default_factory=list)
    model_prior_departure_px: float | None = None

    @property
    def ok(self) -> bool:
        """More than half of the fitted tiles agree, and the model stays within reach of the prior."""
        return (bool(self.agreeing) and 2 * len(self.agreeing) > self.fitted
                and self.model_prior_departure_px is not None
                and self.model_prior_departure_px <= self.prior_limit_px)

    @property
    def reason(self) -> str:
        """Why the tiles do not agree (empty when :attr:`ok`)."""
        if self.ok:
            return ""
        if not self.agreeing:
            return "no tile agrees with the global model"
        if 2 * len(self.agreeing) <= self.fitted:
            return (f"tiles disagree: only {len(self.agreeing)} of {self.fitted} fitted tiles agree with the global "
                    f"model within {self.agree_px:g} px")
        return (f"the global model departs {self.model_prior_departure_px:.1f} px from the prior, beyond the search "
                f"radius ({self.prior_limit_px:.1f} px)")

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, "agree_px": self.agree_px,
                "prior_limit_px": self.prior_limit_px, "tiles_fitted": self.fitted,
                "tiles_agreeing": list(self.agreeing), "tiles_rejected_by_prior": list(self.rejected_by_prior),
                "model_prior_departure_px": self.model_prior_departure_px}


def assess(tiles: list[Tile], model: Mapping | None, prior: np.ndarray, agree_px: float,
           prior_limit_px: float) -> Agreement:
    """Each fitted tile's disagreement with ``model`` (set on the tiles) and the scene's :class:`Agreement`."""
    ag = Agreement(agree_px, prior_limit_px, fitted=len(fitted(tiles)),
                   rejected_by_prior=[t.index for t in tiles if t.status == "rejected"
                                      and t.prior_departure_px is not None and t.disagreement_px is None])
    if model is None:
        return ag
    for t in fitted(tiles):
        t.disagreement_px = distance_rms(model, as_mapping(t.matrix), t.grid_points())
        t.agrees = t.disagreement_px <= agree_px
    agreeing = [t for t in fitted(tiles) if t.agrees]
    ag.agreeing = [t.index for t in agreeing]
    if agreeing:
        corners = np.concatenate([t.grid_points(2) for t in agreeing])
        ag.model_prior_departure_px = distance_max(model, as_mapping(prior), corners)
    return ag


@dataclass(frozen=True)
class Rule:
    """How a scene's tiles are judged and fitted: ``agree_px`` (RMS distance, SAR px, within which a tile fit agrees
    with another or with the model), ``prior_limit_px`` (largest departure from the prior), ``max_distortion``
    (georeferenced priors only, else ``None``: see :func:`reject_beyond_prior`) and the global model's ``kind``,
    inlier ``threshold`` (SAR px) and ``min_inliers`` (:func:`promptmid.scene.model.fit_global`)."""

    agree_px: float
    prior_limit_px: float
    max_distortion: float | None
    kind: str
    threshold: float
    min_inliers: int


TILE_SAMPLES = 5  # each tile fit is sampled on a TILE_SAMPLES x TILE_SAMPLES grid for the global model


def model_from_tiles(use: list[Tile], rule: Rule) -> tuple[GlobalModel | None, str]:
    """:func:`fit_global` on the tile fits of ``use`` (their refined transforms, sampled over each tile)."""
    if not use:
        return None, "no tile gave an accepted fit"
    p0 = np.concatenate([t.grid_points(TILE_SAMPLES) for t in use])
    p1 = np.concatenate([apply_transform(t.matrix, t.grid_points(TILE_SAMPLES)) for t in use])
    model, _, reason = fit_global(p0, p1, rule.kind, rule.threshold, rule.min_inliers)
    return model, reason


def agreeing_model(tiles: list[Tile], prior: np.ndarray, rule: Rule) -> tuple[GlobalModel | None, str, Agreement]:
    """The global model fitted to the fits of the tiles that agree, and the :class:`Agreement` (tiles updated in
    place: prior check, disagreement, agreement): the prior check, the :func:`consensus` group's model, then one
    refit on every tile that agrees with it."""
    reject_beyond_prior(tiles, prior, rule.prior_limit_px, rule.max_distortion, rule.agree_px)
    model, reason = model_from_tiles(consensus(tiles, rule.agree_px), rule)
    agreed = assess(tiles, model.apply if model else None, prior, rule.agree_px, rule.prior_limit_px)
    if model is not None and agreed.agreeing:  # refit once on every tile that agrees with the consensus model
        model, reason = model_from_tiles([t for t in tiles if t.agrees], rule)
        agreed = assess(tiles, model.apply if model else None, prior, rule.agree_px, rule.prior_limit_px)
    return model, reason, agreed


def settled(done: list[Tile], selected: list[Tile], prior: np.ndarray, rule: Rule, settle: int | None) -> bool:
    """At least ``settle`` of the matched tiles ``done`` agree on a global model (:func:`agreeing_model`, run on
    copies), the agreement is ok, and the agreeing tiles spread at least half as far as all ``selected`` tiles
    (:func:`promptmid.scene.grid.spans`): more tiles would not change the model."""
    if not settle or len(fitted(done)) < settle:
        return False
    trial = copy.deepcopy(done)
    _, _, agreed = agreeing_model(trial, prior, rule)
    agreeing = [t for t in trial if t.agrees]
    return agreed.ok and len(agreeing) >= settle and spans(agreeing, selected)


def scene_verdict(model_found: bool, agreement: Agreement | None, tiles: list[Tile],
                  reason: str) -> tuple[str, float, str]:
    """``(status, confidence, reason)`` of a scene (see the module notes).

    ``confidence`` is the highest QC confidence among the agreeing tiles (0 without one); ``reason`` is the
    given failure reason for ``failed``, why the scene is not ``ok`` for ``uncertain``, else ``""``.
    """
    agreeing = [t for t in tiles if t.agrees]
    confidence = max([t.confidence or 0.0 for t in agreeing], default=0.0)
    if not model_found or agreement is None or not agreement.ok:
        return "failed", confidence, reason
    if any(t.verdict == "ok" for t in agreeing):
        return "ok", confidence, ""
    kinds = ", ".join(sorted({f"{t.method} ({t.verdict})" for t in agreeing}))
    return "uncertain", confidence, (f"the tiles agree, but no agreeing tile has a keypoint fit with QC verdict ok "
                                     f"(agreeing: {kinds}; best confidence {confidence:.2f}); check the result")


def tile_qc(tiles: list[Tile], tp: TiePoints) -> None:
    """Per-tile global inliers and RMSE; a fitted tile that disagrees with the global model becomes ``rejected``."""
    for t in tiles:
        mine = tp.tile == t.index
        t.global_inliers = int((mine & tp.inlier).sum())
        if t.global_inliers:
            t.rmse_px = geo.rmse(tp.residual_px[mine & tp.inlier])
        if t.status == "ok" and t.disagreement_px is not None and not t.agrees:
            t.status, t.reason = "rejected", f"tile fit disagrees with the global model by {t.disagreement_px:.1f} px"
