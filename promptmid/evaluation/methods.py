"""The registry of matching methods that ``promptmid eval`` compares.

A *method* is a callable ``(optical: PreparedImage, sar: PreparedImage) -> dict`` returning

- ``points0``: ``[K, 2]`` optical matches, ``points1``: ``[K, 2]`` SAR matches, both in ORIGINAL
  pixels of the images given (x = column, y = row, pixel centres at integers; use
  :meth:`PreparedImage.to_original`),
- ``scores``: ``[K]`` match confidences (higher = better),
- ``timings``: seconds, ``{"features": ..., "matching": ...}``,
- optionally ``rotation_deg``: the SAR rotation (search step) that was kept.

Robust fitting and metrics are NOT part of a method: the runner does them identically for all.

Rotation search: methods that are not rotation-invariant are run with the SAR image rotated by
each angle of ``rotations`` (degrees, counter-clockwise; default ``[0]``), and the matches of the
angle whose affine fit (threshold 3 px) has the most inliers are kept (:func:`with_rotation_search`);
promptmid presets do the same inside :class:`~promptmid.api.Matcher`. The benchmark uses
``[0, 90, 180, 270]`` for every such method, which is fair since srif pairs are rotated up to 90 deg.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from typing import Any

import numpy as np

from promptmid.config import CONCAT, INLIER_THRESHOLD_PX, get_config, merge_options
from promptmid.evaluation.base import MethodFn, MethodSpec
from promptmid.io import PreparedImage
from promptmid.geometry import Size, apply_transform
from promptmid.matching import fit_geometry, search_rotations

FULL_ROTATIONS = [0.0, 90.0, 180.0, 270.0]


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` (names are unique)."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def default_methods() -> list[str]:
    return [name for name, spec in METHODS.items() if spec.default]


def parse_methods(text: str | None) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (checked); ``None``/empty -> :func:`default_methods`."""
    if not text:
        return default_methods()
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    return names


def build_method(name: str, rotations: list[float] | None = None, **conf: Any) -> MethodFn:
    """Instantiate a registered method (loads its models once).

    Args:
        name: registry key.
        rotations: SAR rotations to search (deg); ignored by rotation-invariant methods.
        conf: overrides of the method's ``default_conf`` (unknown keys raise ``ValueError``).
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid: {', '.join(METHODS)}")
    spec = METHODS[name]
    merged = merge_options(spec.default_conf, conf, f"method {name}")
    angles = [0.0] if spec.rotation_invariant or not rotations else [float(a) for a in rotations]
    if spec.rotations_inside:
        merged["rotations"] = angles
        return spec.build(merged)
    fn = spec.build(merged)
    return fn if angles == [0.0] else with_rotation_search(fn, angles)


# the sections of a preset's configuration that a promptmid method's raw matches depend on (the evaluation refines,
# searches and judges every method itself, so "refine", "search" and "qc" settings do not change them)
MATCH_SECTIONS = ("io", "keypoints", "sources", "aggregator", "matching", "geometry")


@functools.lru_cache(maxsize=None)
def settings_fingerprint(name: str) -> str:
    """A short hash of the settings a registered method's raw output depends on: its ``default_conf`` and, for a
    promptmid preset, the resolved sections :data:`MATCH_SECTIONS` of :func:`promptmid.config.get_config` (and, for
    the area search, the resolved search options). Changing a preset or a default in :mod:`promptmid.config`
    changes it, so cached matches of the old settings are not reused (:mod:`promptmid.evaluation.runner`). Changes
    of code or weight files do not: clear the method's cache folder after those."""
    from promptmid.evaluation.area import build_area_search
    from promptmid.search import check_conf

    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid: {', '.join(METHODS)}")
    spec = METHODS[name]
    settings: dict[str, Any] = {"conf": spec.default_conf, "parts": list(spec.parts)}
    if spec.build is build_promptmid:
        config = get_config(spec.default_conf["preset"], spec.default_conf.get("overrides"))
        settings["config"] = {k: config[k] for k in MATCH_SECTIONS}
    elif spec.build is build_area_search:
        settings["search"] = check_conf(spec.default_conf.get("search") or {})
    text = json.dumps(settings, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rotations_for(name: str, rotations: list[float]) -> list[float]:
    """The rotations a method is actually run with (``[0]`` for rotation-invariant ones)."""
    return [0.0] if METHODS[name].rotation_invariant else list(rotations)


def with_rotation_search(fn: MethodFn, rotations: list[float], threshold: float = INLIER_THRESHOLD_PX) -> MethodFn:
    """Run ``fn`` on the SAR image rotated by each angle; keep the angle with most affine inliers.

    The rotated SAR is passed with unit scale, so ``fn`` returns rotated working pixels; they are
    mapped back through the rotation and then to original SAR pixels. Selection fitting time is
    counted as ``matching``.
    """
    from promptmid.io import rotate_prepared

    def run(optical: PreparedImage, sar: PreparedImage) -> dict[str, Any]:
        timings = {"features": 0.0, "matching": 0.0}

        def match_at(angle: float) -> tuple[dict[str, Any], int]:
            rotated, to_sar = rotate_prepared(sar, angle)
            h, w = rotated.image.shape[:2]
            out = fn(optical, dataclasses.replace(rotated, scale=(1.0, 1.0), original_size=Size(w, h)))
            t0 = time.perf_counter()
            out["points1"] = sar.to_original(apply_transform(to_sar, out["points1"])) if len(out["points1"]) else \
                np.zeros((0, 2))
            n = fit_geometry(out["points0"], out["points1"], "affine", threshold).num_inliers
            out["timings"]["matching"] += time.perf_counter() - t0
            for key in timings:
                timings[key] += out["timings"].get(key, 0.0)
            return out, n

        angle, (best, _), _ = search_rotations(rotations, match_at, lambda trial: trial[1])
        return {**best, "rotation_deg": angle, "timings": timings}

    return run


# --- promptmid presets ---------------------------------------------------------------------------


def build_promptmid(conf: dict[str, Any]) -> MethodFn:
    """A promptmid preset through :meth:`Matcher.match` (its own rotation search and I/O settings).

    conf: ``preset`` (``"lite"`` | ``"xfeat"`` | ``"full"``), ``overrides`` (nested config dict),
    ``rotations`` (set by the registry). Timings: ``features`` = every describer stage,
    ``matching`` = MNN plus the Matcher's per-rotation fits (used to pick the rotation).
    """
    from promptmid.api import Matcher
    from promptmid.config import deep_merge

    # the runner refines every method's fit the same way, so the Matcher's own refinement is off here; the area
    # search is its own method ("area-search"), combined with the keypoint matches by the "<method>+area" composites
    overrides = deep_merge(conf.get("overrides") or {},
                           {"geometry": {"rotations": conf["rotations"]}, "refine": {"enabled": False},
                            "search": {"enabled": False}})
    matcher = Matcher(conf["preset"], overrides)

    def run(optical: PreparedImage, sar: PreparedImage) -> dict[str, Any]:
        opt = matcher.prepare(optical.raster, "optical")
        sar_img = matcher.prepare(sar.raster, "sar")
        r = matcher.match(opt, sar_img)
        t = r.timings
        features = sum(v for k, v in t.items() if k not in ("read", "matching", "fitting", "total"))
        return {"points0": r.points0, "points1": r.points1, "scores": r.scores, "rotation_deg": r.rotation_deg,
                "timings": {"features": features, "matching": t.get("matching", 0.0) + t.get("fitting", 0.0)}}

    return run


def _promptmid_spec(preset: str, description: str, default: bool = True, name: str | None = None,
                    overrides: dict[str, Any] | None = None) -> MethodSpec:
    return MethodSpec(f"promptmid-{name or preset}", description, build_promptmid,
                      {"preset": preset, "overrides": overrides}, rotations_inside=True, default=default)


register(_promptmid_spec("lite", "promptmid lite (default): ALIKED-n16 + DINOv2-S/14 L4/8/12 (392 px) fused by the "
                         "trained promptmid-agg-v3, MNN"))
register(_promptmid_spec("lite", "lite with the training-free fusion (concatenation) instead of promptmid-agg-v3",
                         default=False, name="lite-concat-aliked", overrides={"aggregator": CONCAT}))
register(_promptmid_spec("lite", "lite with DINOv2 in int8 (ONNX Runtime dynamic quantisation; speed)", default=False,
                         name="lite-int8", overrides={"sources": {"dinov2": {"precision": "int8"}}}))
register(_promptmid_spec("lite", "lite with DINOv2 at 518 px, the previous default (392 px is as accurate and faster: "
                         "benchmarks/results/dinov2_392_unseen.md)", default=False, name="lite-d518",
                         overrides={"sources": {"dinov2": {"long_side": 518}}}))
register(_promptmid_spec("lite-concat", "promptmid lite-concat: XFeat + DINOv2-S/14, concat fusion"))
register(_promptmid_spec("xfeat", "promptmid xfeat: XFeat keypoints and descriptors only, MNN"))
register(_promptmid_spec("aliked", "promptmid aliked: ALIKED-n16 keypoints and descriptors, MNN + guided matching",
                         default=False))
register(_promptmid_spec("lite", "lite-concat-aliked with position-free DINOv2 (patch position embeddings "
                         "averaged; ablation)", default=False, name="lite-posfree",
                         overrides={"sources": {"dinov2": {"position": "mean"}}, "aggregator": CONCAT}))
register(_promptmid_spec("lite-concat", "the previous default: XFeat + DINOv2 fused by the trained promptmid-agg-v2 "
                         "(learned image position)", default=False, name="lite-agg-v2",
                         overrides={"aggregator": {"name": "promptmid-agg-v2"}}))
register(_promptmid_spec("full", "promptmid full: ALIKED + DINOv2 + PromptDM-small DIFT features (land use auto) fused "
                         "by promptmid-agg-full-v1", default=False))
register(_promptmid_spec("full", "full with an empty prompt (ablation)", default=False, name="full-noprompt",
                         overrides={"sources": {"diffusion": {"prompt": " "}}}))
register(_promptmid_spec("full", "full with a wrong prompt, 'a photograph of a cat on a sofa' (ablation)",
                         default=False, name="full-wrongprompt",
                         overrides={"sources": {"diffusion": {"prompt": "a photograph of a cat on a sofa"}}}))


def _register_others() -> None:
    from promptmid.evaluation import area, baselines, rift

    for spec in (*baselines.SPECS, rift.SPEC, area.SPEC, area.LEARNED_SPEC, area.TRAINED_SPEC):
        register(spec)
    for name in ("promptmid-lite", "promptmid-lite-d518", "promptmid-lite-int8", "aliked-mnn", "promptmid-full"):
        register(area.composite(name, METHODS[name].description))
        register(area.composite(name, METHODS[name].description, (area.LEARNED_SPEC.name,)))
        register(area.composite(name, METHODS[name].description, (area.TRAINED_SPEC.name,)))
        register(area.composite(name, METHODS[name].description, (area.SPEC.name, area.LEARNED_SPEC.name), "area-both"))
        register(area.composite(name, METHODS[name].description, (area.SPEC.name, area.TRAINED_SPEC.name),
                                "area-both-trained"))


_register_others()
