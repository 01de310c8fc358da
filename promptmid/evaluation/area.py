"""Area-based methods for ``promptmid eval``: the global area search alone, and keypoint methods combined with it.

- ``area-search``: the classical area-based peer, :func:`promptmid.search.global_search` on oriented-gradient
  features with no learned part. It has no matches; its output carries ``hypotheses`` (original px transforms),
  which the runner refines and judges exactly like the product does (:func:`promptmid.qc.choose`).
- ``<method>+area``: a composite (``MethodSpec.parts``): the matches of ``<method>`` and the hypotheses of
  ``area-search``, both read from the per-method cache; the ``+refine`` rows keep whichever candidate the QC
  evidence prefers, as :class:`promptmid.api.Matcher` does with ``search.enabled``.

Rotation search: with several ``rotations`` (the validation run's 0/90/180/270), the area search covers every
rotation (``rotation_range`` 180 at ``full_circle_step`` deg) and the wider ``full_circle_scales`` (the rotated
validation pairs also differ in scale by up to 2x), the counterpart of ``--try-rotations``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from promptmid.config import DEFAULTS
from promptmid.evaluation.base import MethodFn, MethodSpec
from promptmid.io import PreparedImage
from promptmid.search import global_search

SEARCH_DEFAULTS = {k: v for k, v in DEFAULTS["search"].items() if k != "enabled"}


def build_area_search(conf: dict[str, Any]) -> MethodFn:
    """``conf``: ``search`` (overrides of the search options), ``full_circle_step``, ``full_circle_scales``,
    ``rotations`` (set by the registry)."""
    search_conf = dict(conf.get("search") or {})
    if len(conf["rotations"]) > 1:
        search_conf.update(rotation_range=180.0, rotation_step=conf["full_circle_step"],
                           scale_range=tuple(conf["full_circle_scales"]), scale_steps=conf["full_circle_scale_steps"])

    def run(optical: PreparedImage, sar: PreparedImage) -> dict[str, Any]:
        t0 = time.perf_counter()
        hyps = global_search(optical, sar, search_conf)
        return {"points0": np.zeros((0, 2)), "points1": np.zeros((0, 2)), "scores": np.zeros(0),
                "hypotheses": [h.to_dict() for h in hyps],
                "timings": {"features": 0.0, "matching": time.perf_counter() - t0}}

    return run


SPEC = MethodSpec("area-search", "global area-based search: oriented-gradient features, FFT correlation over "
                  "rotation x scale, top hypotheses polished (no learned part)", build_area_search,
                  {"search": None, "full_circle_step": 6.0, "full_circle_scales": (0.5, 2.0),
                   "full_circle_scale_steps": 11}, rotations_inside=True, default=False)


def composite(method: str, description: str) -> MethodSpec:
    """``<method>+area``: the matches of ``method`` and the hypotheses of ``area-search``, chosen by evidence."""
    return MethodSpec(f"{method}+area", f"{description} + area-search hypotheses, one chosen by QC evidence",
                      _no_build, rotations_inside=True, default=False, parts=(method, "area-search"))


def _no_build(conf: dict[str, Any]) -> MethodFn:
    raise ValueError("a composite method is evaluated from its parts (MethodSpec.parts), never built")
