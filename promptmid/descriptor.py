"""Image -> keypoints, scores and modality-invariant descriptors.

:class:`Describer` chains the keypoint extractor, the enabled feature sources (DINOv2,
diffusion) and the aggregator. It works on one image at a time; its output dict is

- ``keypoints``: ``[N, 2]`` float32 (x, y) pixels of the working-resolution image,
- ``scores``: ``[N]`` detector scores,
- ``descriptors``: ``[N, D]`` L2-normalised,
- ``image_size``: :class:`~promptmid.geometry.Size` ``(W, H)`` of the working-resolution image,
- ``timings``: seconds per stage.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from promptmid.errors import ModelError
from promptmid.geometry import Size
from promptmid.io import PreparedImage, image_tensor
from promptmid.models.aggregation import Aggregator, ConcatFusion
from promptmid.models.base import FeatureSource, PairContext
from promptmid.models.keypoints import KeypointExtractor


def build_source(name: str, conf: dict[str, Any]) -> FeatureSource:
    """Instantiate a feature source by name (``"dinov2"`` or ``"diffusion"``)."""
    if name == "dinov2":
        from promptmid.models.vfm import DINOv2Features

        return DINOv2Features(**conf)
    if name == "diffusion":
        from promptmid.models.diffusion import DiffusionFeatures

        if not conf.get("model"):
            raise ModelError("the diffusion feature source needs a Stable Diffusion model in diffusers layout: "
                             "pass --dm PATH (see README, 'Diffusion features').")
        return DiffusionFeatures(**conf)
    raise ValueError(f"Unknown feature source {name!r}; valid: dinov2, diffusion")


def build_aggregator(conf: dict[str, Any]) -> Aggregator:
    """Instantiate the aggregator: ``{"name": "concat", "weights": {...}}`` or a trained one."""
    conf = dict(conf)
    name = conf.pop("name", "concat")
    if name == "concat":
        return ConcatFusion(**conf)
    from promptmid.models.aggregation import load_aggregator  # trained modules

    return load_aggregator(name, **conf)


class Describer:
    """Keypoints + feature sources + aggregation for one image.

    Args:
        keypoints: options of :class:`~promptmid.models.keypoints.KeypointExtractor`.
        sources: ``{source name: options}`` for :func:`build_source`.
        aggregator: options for :func:`build_aggregator`.
    """

    def __init__(
        self,
        keypoints: dict[str, Any] | None = None,
        sources: dict[str, dict[str, Any]] | None = None,
        aggregator: dict[str, Any] | None = None,
    ) -> None:
        self.extractor = KeypointExtractor(**(keypoints or {}))
        self.sources = {name: build_source(name, conf) for name, conf in (sources or {}).items() if conf is not None}
        self.aggregator = build_aggregator(aggregator or {"name": "concat"})

    def begin_pair(self, optical: PreparedImage) -> PairContext:
        """A new pair's context: prompted sources pick the land-use class on the optical image.

        Pass the returned context to :meth:`features` / ``__call__`` for both images of the pair.
        """
        context = PairContext()
        for source in self.sources.values():
            source.begin_pair(image_tensor(optical), context)
        return context

    @torch.inference_mode()
    def features(self, prepared: PreparedImage, context: PairContext | None = None) -> dict[str, Any]:
        """Keypoints and per-source features before aggregation (what aggregator training caches).

        ``context``: the pair's :class:`PairContext` from :meth:`begin_pair` (a fresh one when ``None``:
        the image is then described on its own, e.g. a training view).

        Returns:
            ``keypoints [N, 2]`` (x, y working px), ``scores [N]``, ``features {key: [N, C]}`` (the local
            descriptor under :attr:`KeypointExtractor.local_name`, then every source's keys),
            ``image_size`` (:class:`~promptmid.geometry.Size`, ``(W, H)``), ``timings``.
        """
        image = image_tensor(prepared)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        local = self.extractor(image, prepared.valid)
        timings["keypoints"] = time.perf_counter() - t0
        features = {self.extractor.local_name: local["descriptors"]}
        context = context if context is not None else PairContext()
        for name, source in self.sources.items():
            t0 = time.perf_counter()
            features.update(source.describe(image, local["keypoints"], modality=prepared.modality, context=context))
            timings[name] = time.perf_counter() - t0
        return {"keypoints": local["keypoints"], "scores": local["scores"], "features": features,
                "image_size": Size.of(prepared.image), "timings": timings}

    @torch.inference_mode()
    def __call__(self, prepared: PreparedImage, context: PairContext | None = None) -> dict[str, Any]:
        out = self.features(prepared, context)
        t0 = time.perf_counter()
        desc = self.aggregator(out.pop("features"), out["keypoints"], out["image_size"])
        out["timings"]["aggregation"] = time.perf_counter() - t0
        return {**out, "descriptors": desc}

    def info(self) -> dict[str, Any]:
        """Model names/versions/checksums for ``result.json``."""
        from promptmid.models.weights import MODELS

        spec = MODELS["aliked_n16" if self.extractor.local_name == "aliked" else "xfeat"]
        local = {"name": spec.name, "source": spec.pip_requirement, "sha256": spec.sha256[:16]}
        out: dict[str, Any] = {"keypoints": {**local, "detector": self.extractor.conf.detector}}
        out["aggregator"] = self.aggregator.name
        for name, source in self.sources.items():
            out[name] = source.info()
        return out
