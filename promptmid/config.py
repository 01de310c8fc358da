"""Named presets of the whole pipeline, as nested dicts (hloc-style).

A preset is ``{"io": ..., "keypoints": ..., "sources": ..., "aggregator": ..., "matching": ...,
"geometry": ...}``. :func:`get_config` returns a deep copy of a preset with overrides merged
in, so ``get_config("lite", {"geometry": {"model": "homography"}})`` changes one key and
``{"sources": {"dinov2": None}}`` disables a source. An ``aggregator`` override replaces the
preset's aggregator dict whole (its keys depend on the aggregator).
"""

from __future__ import annotations

import copy
from typing import Any

INLIER_THRESHOLD_PX = 3.0  # default inlier / correctness threshold (original SAR px), used everywhere
SUCCESS_PX = 5.0  # a pair is registered when its RMSE (or mean corner error) against the truth is <= this (px)


def merge_options(defaults: dict[str, Any], options: dict[str, Any], owner: str) -> dict[str, Any]:
    """``defaults`` updated with ``options``; an unknown key raises ``ValueError`` naming ``owner`` and the valid keys.

    The one place where components (keypoints, sources, aggregators, methods) check their options.
    """
    unknown = set(options) - set(defaults)
    if unknown:
        raise ValueError(f"Unknown {owner} option(s) {sorted(unknown)}; valid: {sorted(defaults)}")
    return {**defaults, **options}


# search.learned: "aliked" stacks ALIKED's dense channels (fixed random projection) onto the gradients, "trained" the
# same map through the trained projection (training/search_head.py); "both" / "both-trained" run the classical search
# and that one and pool their hypotheses (the QC picks). Value -> the channels of each search run (None: gradients)
SEARCH_CHANNEL_SETS: dict[str, tuple[str | None, ...]] = {
    "aliked": ("aliked",), "trained": ("trained",), "both": (None, "aliked"), "both-trained": (None, "trained")}
SEARCH_FEATURES = tuple(SEARCH_CHANNEL_SETS)
DEFAULT_ROTATION_STEP = 90.0  # degrees between the SAR rotations tried by --try-rotations
# defaults of the diffusion feature source that the CLI shows (the source's own default_conf must agree)
DIFFUSION_DEFAULTS: dict[str, Any] = {"ensemble": 4}
# every option of the keypoint stage (promptmid.models.keypoints.KeypointExtractor) and its default
KEYPOINT_DEFAULTS: dict[str, Any] = {
    "detector": "xfeat",  # "xfeat" | "aliked" | "sift" | "grid"
    "top_k": 2048,  # keep the best k keypoints per image
    "detection_threshold": 0.05,  # XFeat heatmap threshold
    "aliked_threshold": 0.2,  # ALIKED score-map threshold
    "nms_radius": 2,  # XFeat non-maximum suppression radius (px at stride 1)
    "grid_step": 8,  # spacing (px) of the "grid" detector
    "mask_margin": 4,  # drop keypoints this close (px) to invalid pixels
    "device": "cpu",
}

DEFAULTS: dict[str, Any] = {
    "io": {
        "max_side": 1024,  # working resolution: long side at most this (px); results are in original px
        "sar_scale": "auto",  # SAR radiometry: "auto" | "log" | "linear"
        "nan_as_nodata": False,  # also mask NaN/inf pixels of the optical image (SAR NaN/inf are always nodata)
        "detect_fill": True,  # mask exact-zero fill touching the border (rotation corners)
        "sar_smooth": 0.0,  # Gaussian sigma (px) on log-scaled SAR against speckle; 0 = off
        "optical_bands": None,  # 1-based bands, e.g. "4,3,2" (red, green, blue) or "1"; None = automatic (io.choose_bands)
        "sar_bands": None,  # 1-based bands, e.g. "1" (VV); None = automatic: the co-pol band of dual-pol data
    },
    "keypoints": {"detector": "xfeat", "top_k": KEYPOINT_DEFAULTS["top_k"]},
    "sources": {},
    "aggregator": {"name": "concat"},
    "matching": {
        "ratio": None,  # Lowe ratio test on descriptor distance; None = off (it hurt on real pairs)
        "min_similarity": -1.0,  # drop matches whose cosine similarity is below this
        "guided_iterations": 2,  # re-match near the first fit's prediction and refit; 0 = off
        "guided_radius": 8.0,  # search radius (SAR px) of guided matching
    },
    "geometry": {
        "model": "affine",  # "affine" | "homography" | "similarity"
        "threshold": INLIER_THRESHOLD_PX,  # inlier threshold, original SAR pixels
        "min_inliers": 6,  # fewer inliers = failed fit (no transform is reported)
        "rotations": [0],  # SAR rotations tried (degrees, counter-clockwise); best fit kept
    },
    "refine": {  # area-based refinement of the fit with oriented-gradient features (promptmid.refine)
        "enabled": True,
        "block": 64,  # block side (working px)
        "search": 8,  # search radius around the fitted position (working px)
        "min_distinct": 0.005,  # correlation peak minus best score > 3 px away, for a block to count
        "min_blocks": 8,  # fewer accepted blocks = keep the keypoint fit
        "max_blocks": None,  # most blocks per pass (None: every half-block; a cap widens the grid on large images)
        "threshold": 1.5,  # inlier threshold of the correction fit (working px)
        "iterations": 3,  # passes (each re-warps with the refined transform)
        "polish": True,  # dense affine polish of each area hypothesis before its blocks (promptmid.polish)
    },
    "search": {  # global area-based search for transform hypotheses without keypoints (promptmid.search)
        "enabled": True,  # on in every preset: lite+area beats lite on validation and every unseen group
        "size": 256,  # long side (px) of the fine level (each image reduced independently)
        "coarse_size": 128,  # long side (px) of the coarse level (the full rotation x scale grid)
        "rotation_range": 15.0,  # rotations searched: -range .. +range (deg); 180 = every rotation (--try-rotations)
        "rotation_step": 3.0,  # coarse rotation step (deg)
        "scale_range": (0.8, 1.25),  # SAR scale relative to the prior (same footprint, or the pixel sizes)
        "scale_steps": 7,  # coarse scales, geometrically spaced over scale_range
        "min_overlap": 0.4,  # least overlap of the valid areas, as a share of the smaller one
        "max_shift": None,  # largest distance of the centres from the prior (share of the SAR size); None = any
        "top_k": 3,  # hypotheses kept per search (distinct, best correlation first); 2 was measured and not kept
        # (docs/results.md: validation +1, unseen Sentinel-1 -1)
        "polished_peaks": 5,  # coarse peaks polished (distinct, best first; at least top_k) before the top_k are kept
        "peaks_per_cell": 2,  # correlation peaks kept per (rotation, scale) cell before choosing the top_k
        "orientations": 9,  # oriented-gradient channels
        "sigma": 1.0,  # Gaussian smoothing of the channels (px of the coarse level; x1.5 at the fine level)
        "learned": "both-trained",  # learned dense channels: None | "aliked" | "trained" | "both" | "both-trained" (SEARCH_FEATURES)
        "skip_when_ok": True,  # no search when the keypoint fit's verdict already is ok (selection.settled)
        "ranker": "hand",  # the pick's score: "hand" (selection.HandRule) | "trained" (ranker.py; an option: it tied
        # validation and lost one unseen pair, benchmarks/results/area_search_ranker.md)
        "dense": None,  # weights of a coarse dense matcher (training/dense_matcher.py): its hypothesis joins the
        # pick; None = off. No weights are shipped: trained on 2 CPUs it found no usable matches (docs/results.md)
    },
}

# every option of the DINOv2 feature source (promptmid.models.vfm.DINOv2Features) and its default
DINOV2_DEFAULTS: dict[str, Any] = {
    "layers": [4, 8, 12],  # 1-based transformer blocks to output, each in 1..12
    "long_side": 518,  # pixels of the resized long side (rounded to multiples of 14)
    "norm": True,  # apply the final LayerNorm to every block's tokens (DINOv2 standard)
    "position": "absolute",  # patch position embeddings: "absolute" (as trained) | "mean" (position-free)
    "device": "cpu",  # torch device the backbone runs on (fp32)
    "runtime": "auto",  # "onnxruntime" (CPU) | "torch" (transformers) | "auto": ONNX Runtime on CPU, torch on a GPU
    "precision": "fp32",  # ONNX Runtime weights: "fp32" | "int8" (dynamic quantisation of the MatMuls; torch: fp32)
}
DINOV2 = {k: DINOV2_DEFAULTS[k] for k in ("layers", "long_side", "runtime")}  # what the presets show
# lite runs DINOv2 at 392 px (28 x 28 patches): 0.32 s per 512 px image instead of 0.57 s at 518, with the same SR@5
# on perturbed validation under both displacement seeds (336 px lost a pair) and one more unseen pair
# (112 of 148 against 111, QC precision of ok 1.000); benchmarks/results/dinov2_392_*.md
LITE_DINOV2 = {**DINOV2, "long_side": 392}
CONCAT = {"name": "concat", "weights": {"xfeat": 1.0, "aliked": 1.0, "dinov2": 0.7, "sd": 0.7}}
ALIKED = {"detector": "aliked", "top_k": KEYPOINT_DEFAULTS["top_k"]}
# the diffusion source of preset "full": PromptDM-small, timestep and up-block chosen on perturbed validation
# (benchmarks/results/diffusion.md); the land-use classifier scores the image at 64 px, 4 timesteps, 1 draw
PROMPTDM = {"model": "promptdm-small", "land_use": "auto", "timestep": 200, "up_blocks": (1,), "ensemble": 1,
            "long_side": 256, "selection_long_side": 64, "selection_noise": 1}

PRESETS: dict[str, dict[str, Any]] = {
    # XFeat local descriptors only (baseline)
    "xfeat": {},
    # default: ALIKED-n16 keypoints and descriptors + DINOv2-S/14 multi-layer features, fused by promptmid-agg-v3
    # (trained on views with independent warps of both images, selected on the perturbed validation pairs;
    # benchmarks/results/realpairs.md). promptmid-agg-v1/v2 (XFeat + DINOv2) learned image position: no preset.
    "lite": {"keypoints": ALIKED, "sources": {"dinov2": LITE_DINOV2}, "aggregator": {"name": "promptmid-agg-v3"}},
    # XFeat keypoints and descriptors + DINOv2-S/14, training-free fusion
    "lite-concat": {"sources": {"dinov2": DINOV2}, "aggregator": CONCAT},
    # ALIKED-n16 keypoints and descriptors only (our matching: MNN + guided re-matching)
    "aliked": {"keypoints": ALIKED},
    # lite + PromptDM-small (our own prompt-conditioned diffusion model, shipped) DIFT features, fused by the
    # aggregator promptmid-agg-full-v1 trained with them (promptmid/weights/PROMPTDM_CARD.md); --dm PATH swaps in a
    # Stable Diffusion model, which then needs an aggregator trained with its features (or --aggregator none)
    "full": {
        "keypoints": ALIKED,
        "sources": {"dinov2": DINOV2, "diffusion": PROMPTDM},
        "aggregator": {"name": "promptmid-agg-full-v1"},
    },
}


# sections an override replaces whole instead of merging into (an aggregator's keys depend on its name)
REPLACED_WHOLE = ("aggregator",)


def deep_merge(base: dict[str, Any], override: dict[str, Any], replace: tuple[str, ...] = ()) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``override`` (neither is modified).

    Top-level keys in ``replace`` are taken from ``override`` whole (e.g. :data:`REPLACED_WHOLE`).
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in replace:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get_config(preset: str = "lite", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The full configuration of a preset with ``overrides`` merged in.

    Raises:
        ValueError: unknown preset name (the message lists the valid ones).
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
    return deep_merge(deep_merge(DEFAULTS, PRESETS[preset], REPLACED_WHOLE), overrides or {}, REPLACED_WHOLE)
