"""Area-based methods for ``promptmid eval``: the global area search alone, and keypoint methods combined with it.

- ``area-search``: the classical area-based peer, :func:`promptmid.search.global_search` on oriented-gradient
  features with no learned part. It has no matches; its output carries ``hypotheses`` (original px transforms),
  which the runner refines and judges exactly like the product does (:func:`promptmid.selection.choose`).
- ``<method>+area``: a composite (``MethodSpec.parts``): the matches of ``<method>`` and the hypotheses of
  ``area-search``, both read from the per-method cache; the ``+refine`` rows keep whichever candidate the QC
  evidence prefers, as :class:`promptmid.api.Matcher` does with ``search.enabled``.
- ``<method>+area-both`` / ``<method>+area-both-trained``: the hypotheses of both searches (``area-search`` and
  ``area-search-aliked`` / ``area-search-trained``) pooled, as the Matcher does with ``search.learned = "both"`` /
  ``"both-trained"`` (the default); ``<method>+area-search-trained``: keypoints and the trained search only.

Rotation search: with several ``rotations`` (the validation run's 0/90/180/270), the area search covers every
rotation (``rotation_range`` 180), as :class:`promptmid.api.Matcher` does with ``--try-rotations``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from promptmid.evaluation.base import MethodFn, MethodSpec
from promptmid.io import PreparedImage
from promptmid.search import global_search, search_source



def build_area_search(conf: dict[str, Any]) -> MethodFn:
    """``conf``: ``search`` (overrides of the search options), ``learned`` (learned channels: ``None``, ``"aliked"``
    or ``"trained"``, :func:`promptmid.models.dense_features.search_features`), ``rotations`` (set by the registry)."""
    search_conf = dict(conf.get("search") or {})
    if len(conf["rotations"]) > 1:
        search_conf["rotation_range"] = 180.0
    learned = None
    if conf.get("learned"):
        from promptmid.models.dense_features import search_features

        learned = search_features(conf["learned"])

    def run(optical: PreparedImage, sar: PreparedImage) -> dict[str, Any]:
        t0 = time.perf_counter()
        hyps = global_search(optical, sar, search_conf, learned=learned)
        return {"points0": np.zeros((0, 2)), "points1": np.zeros((0, 2)), "scores": np.zeros(0),
                "hypotheses": [h.to_dict() for h in hyps],
                "timings": {"features": 0.0, "matching": time.perf_counter() - t0}}

    return run


SPEC = MethodSpec("area-search", "global area-based search: oriented-gradient features, FFT correlation over "
                  "rotation x scale, top hypotheses polished (no learned part)", build_area_search,
                  {"search": None, "learned": None}, rotations_inside=True, default=False)
LEARNED_SPEC = MethodSpec("area-search-aliked", "the global area-based search with ALIKED's dense channels stacked "
                          "onto the oriented gradients (search.learned = 'aliked')", build_area_search,
                          {"search": None, "learned": "aliked"}, rotations_inside=True, default=False)
TRAINED_SPEC = MethodSpec("area-search-trained", "the global area-based search with ALIKED's dense channels through "
                          "the trained projection stacked onto the oriented gradients (search.learned = 'trained')",
                          build_area_search, {"search": None, "learned": "trained"}, rotations_inside=True,
                          default=False)


def kept_hypotheses(hypotheses: list[Any], top_k: int) -> list[Any]:
    """The first ``top_k`` hypotheses of each search (by ``source``, order kept), as the product keeps them.

    Cached search outputs may hold more (made with a larger ``search.top_k``); a search's list is best first and
    the polished peaks do not depend on ``top_k`` (``search.polished_peaks``), so its first ``top_k`` are exactly
    what a search with that ``top_k`` returns."""
    count: dict[str, int] = {}
    kept = []
    for h in hypotheses:
        source = getattr(h, "source", "area")
        count[source] = count.get(source, 0) + 1
        if count[source] <= top_k:
            kept.append(h)
    return kept


def area_source(spec: MethodSpec) -> str:
    """The ``source`` of the hypotheses of an area method (:func:`promptmid.search.search_source` of its ``learned``
    setting; taken from the spec, so hypotheses cached before sources were recorded are named right too)."""
    from promptmid.models.dense_features import CHANNEL_NAMES

    learned = spec.default_conf.get("learned")
    return search_source(CHANNEL_NAMES.get(learned, learned) if learned else None)


def composite(method: str, description: str, areas: tuple[str, ...] = ("area-search",), suffix: str | None = None
              ) -> MethodSpec:
    """``<method>+<suffix>``: the matches of ``method`` and the hypotheses of the area methods ``areas``, pooled and
    chosen by evidence (``suffix`` defaults to ``area`` for the classical search, else the area method's name)."""
    suffix = suffix or ("area" if areas == ("area-search",) else "+".join(areas))
    return MethodSpec(f"{method}+{suffix}", f"{description} + {' + '.join(areas)} hypotheses, one chosen by QC "
                      "evidence", _no_build, rotations_inside=True, default=False, parts=(method, *areas))


def _no_build(conf: dict[str, Any]) -> MethodFn:
    raise ValueError("a composite method is evaluated from its parts (MethodSpec.parts), never built")
