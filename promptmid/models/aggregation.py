"""Fusing per-keypoint features of several sources into one descriptor.

An aggregator takes the dict of per-source keypoint features of ONE image
(``{"xfeat": [N, 64], "dinov2_l4": [N, 384], ...}``), the keypoints ``[N, 2]`` (x, y px)
and the image :class:`~promptmid.geometry.Size` ``(W, H)``, and returns ``[N, D]`` L2-normalised descriptors.
Aggregators never see the other image, so descriptors can be cached and indexed.

:class:`ConcatFusion` is the training-free fusion: each source is L2-normalised,
weighted and concatenated, then the result is L2-normalised again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from promptmid.config import merge_options
from promptmid.geometry import Size
from promptmid.models.weights import AGGREGATOR_FILES, AGGREGATOR_SHA256, WEIGHTS_DIR


class Aggregator(Protocol):
    """Anything that turns per-source keypoint features into descriptors."""

    name: str

    def __call__(
        self, features: dict[str, torch.Tensor], keypoints: torch.Tensor, image_size: Size
    ) -> torch.Tensor: ...


class ConcatFusion:
    """Training-free fusion by weighted concatenation of L2-normalised sources.

    Args:
        weights: weight per source *group*: a feature key belongs to the group named by
            its prefix before ``_`` (``"dinov2_l8"`` -> ``"dinov2"``). Keys of a group
            share its weight equally in norm (each gets ``w / sqrt(n_keys)``), so a
            group's total contribution does not grow with its number of layers.
            Groups absent from ``weights`` get weight 1.
    """

    name = "concat"

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.weights = dict(weights or {})

    def __call__(
        self, features: dict[str, torch.Tensor], keypoints: torch.Tensor, image_size: Size
    ) -> torch.Tensor:
        groups: dict[str, list[str]] = {}
        for key in sorted(features):
            groups.setdefault(key.split("_")[0], []).append(key)
        parts = []
        for group, keys in groups.items():
            w = self.weights.get(group, 1.0) / math.sqrt(len(keys))
            if w == 0:
                continue
            parts += [w * F.normalize(features[k].float(), dim=-1) for k in keys]
        return F.normalize(torch.cat(parts, dim=-1), dim=-1)


# --------------------------------------------------------------------------- trained aggregation


# the shipped trained aggregators: name -> file in promptmid/weights/, and each file's pinned sha256 (a replaced
# file *and* sidecar is still refused); the tables live in promptmid.models.weights
SHIPPED = AGGREGATOR_FILES
SHIPPED_SHA256 = AGGREGATOR_SHA256


class _MLP(nn.Sequential):
    def __init__(self, dims: list[int]) -> None:
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers += [nn.LayerNorm(dims[i + 1]), nn.GELU()]
        super().__init__(*layers)


class TextureSemanticBlock(nn.Module):
    """Local (texture) features attend to the keypoint's semantic tokens; gated residual sum.

    ``local [N, D]``, ``semantic [N, S, D]`` -> ``[N, D]``. Attention is per keypoint over its
    S semantic tokens (one per semantic source/layer; they serve as keys and values), so the
    cost is linear in N.
    """

    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, local: torch.Tensor, semantic: torch.Tensor) -> torch.Tensor:
        n, s, d = semantic.shape
        h = self.heads
        q = self.q(self.norm_q(local)).view(n, 1, h, d // h)
        kv = self.norm_kv(semantic).view(n, s, h, d // h)
        att = torch.softmax((q * kv).sum(-1) / math.sqrt(d // h), dim=1)  # [N, S, h]
        a = self.out((att[..., None] * kv).sum(1).reshape(n, d))
        g = torch.sigmoid(self.gate(local + a))
        x = local + g * a
        return x + self.ffn(x)


class LocalGlobalBlock(nn.Module):
    """Attention from every keypoint to the image's keypoints, with a positional encoding of
    normalised (x, y).

    Keys/values are the first ``tokens`` keypoints (the extractor sorts them by score, so these
    are the strongest; 0 = all keypoints, i.e. full self-attention), which keeps the cost linear
    in N. The encoding enters queries and keys only (values stay appearance), and the output is
    added through a learnt scalar gate that starts small, so the block can only refine.
    """

    def __init__(self, dim: int, heads: int = 4, tokens: int = 512) -> None:
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.pos = _MLP([2, 32, dim])
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.scale = nn.Parameter(torch.tensor(0.1))
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        n, d = x.shape
        h = self.heads
        m = n if self.tokens <= 0 else min(n, self.tokens)
        y = self.norm(x)
        yp = y + self.pos(xy)
        q = self.q(yp).view(n, h, d // h).transpose(0, 1)
        k = self.k(yp[:m]).view(m, h, d // h).transpose(0, 1)
        v = self.v(y[:m]).view(m, h, d // h).transpose(0, 1)
        a = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # [h, N, d/h]
        x = x + self.scale * self.out(a.transpose(0, 1).reshape(n, d))
        return x + self.ffn(x)


class PromptMIDAggregator(nn.Module):
    """Trained per-image aggregation of local, semantic (and diffusion) keypoint features.

    Input: ``features`` ``{key: [N, C_key]}`` with at least the keys of ``conf.sources``
    (extra keys are ignored), ``keypoints [N, 2]`` (x, y px), ``image_size`` :class:`~promptmid.geometry.Size` ``(W, H)``.
    Output: ``[N, dim]`` L2-normalised descriptors.

    Per-source projections to ``dim``; the local source (``conf.local``, XFeat) goes through a
    small trainable head; the texture-semantic block lets it attend to the semantic tokens
    (all other sources); the local-global block mixes keypoints of the image.
    """

    name = "promptmid-agg"
    default_conf: dict[str, Any] = {
        "sources": {"xfeat": 64, "dinov2_l4": 384, "dinov2_l8": 384, "dinov2_l12": 384},  # key -> channels
        "local": "xfeat",  # the texture source (queries of the texture-semantic block); None = none
        "dim": 256,  # descriptor size
        "heads": 4,
        "texture_semantic": True,  # False: local + mean of projected semantic tokens (ablation)
        "local_global": True,  # False: no keypoint self-attention (ablation)
        "global_tokens": 512,  # keypoints used as keys/values of the local-global block; 0 = all
    }

    def __init__(self, **conf: Any) -> None:
        super().__init__()
        self.conf = SimpleNamespace(**merge_options(self.default_conf, conf, "aggregator"))
        self.conf.sources = dict(self.conf.sources)
        c, d = self.conf, self.conf.dim
        if c.local is not None and c.local not in c.sources:
            raise ValueError(f"local source {c.local!r} is not among the sources {sorted(c.sources)}")
        self.semantic_keys = [k for k in c.sources if k != c.local]
        if not c.sources:
            raise ValueError("the aggregator needs at least one source")
        self.local_head = _MLP([c.sources[c.local], d, d]) if c.local else None
        self.proj = nn.ModuleDict({k.replace(".", "_"): _MLP([c.sources[k], d]) for k in self.semantic_keys})
        self.source_embed = nn.Parameter(torch.zeros(max(1, len(self.semantic_keys)), d))
        use_ts = c.texture_semantic and self.local_head is not None and self.semantic_keys
        self.ts = TextureSemanticBlock(d, c.heads) if use_ts else None
        self.lg = LocalGlobalBlock(d, c.heads, c.global_tokens) if c.local_global else None
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))

    def config(self) -> dict[str, Any]:
        return dict(vars(self.conf))

    def forward(self, features: dict[str, torch.Tensor], keypoints: torch.Tensor,
                image_size: Size) -> torch.Tensor:
        missing = [k for k in self.conf.sources if k not in features]
        if missing:
            raise ValueError(f"aggregator {self.name!r} needs features {missing} (have {sorted(features)}); "
                             "enable the matching sources or use --aggregator none")
        n = len(keypoints)
        dev = self.head[1].weight.device
        if n == 0:
            return torch.zeros(0, self.conf.dim, device=dev)
        feats = {k: F.normalize(features[k].to(dev, torch.float32), dim=-1) for k in self.conf.sources}
        sem = None
        if self.semantic_keys:
            sem = torch.stack([self.proj[k.replace(".", "_")](feats[k]) for k in self.semantic_keys], dim=1)
            sem = sem + self.source_embed[None]
        if self.local_head is not None:
            x = self.local_head(feats[self.conf.local])
            if self.ts is not None:
                x = self.ts(x, sem)
            elif sem is not None:
                x = x + sem.mean(dim=1)
        else:
            x = sem.mean(dim=1)
        if self.lg is not None:
            w, h = image_size
            xy = keypoints.to(dev, torch.float32) / x.new_tensor([max(w - 1, 1), max(h - 1, 1)]) * 2 - 1
            x = self.lg(x, xy)
        return F.normalize(self.head(x), dim=-1)


class TrainedAggregator:
    """:class:`Aggregator` wrapper (inference mode) around a loaded :class:`PromptMIDAggregator`."""

    def __init__(self, module: PromptMIDAggregator, name: str, info: dict[str, Any] | None = None) -> None:
        self.module = module.eval()
        self.name = name
        self.info = dict(info or {})

    @torch.inference_mode()
    def __call__(self, features: dict[str, torch.Tensor], keypoints: torch.Tensor,
                 image_size: Size) -> torch.Tensor:
        return self.module(features, keypoints, image_size).cpu()


def save_aggregator(module: PromptMIDAggregator, path: str | Path, dtype: torch.dtype = torch.float32,
                    info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``path`` (safetensors) and the sidecar ``path.json`` (config, sha256, info).

    Returns:
        the sidecar dict.
    """
    from safetensors.torch import save_file

    from promptmid.models.weights import sha256_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    meta = {"format": "promptmid-aggregator/1", "config": module.config(), "dtype": str(dtype).split(".")[-1],
            "file": path.name, "sha256": sha256_file(path), **(info or {})}
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_aggregator_file(path: str | Path, device: str = "cpu") -> tuple[PromptMIDAggregator, dict[str, Any]]:
    """Load a weights file written by :func:`save_aggregator`, checking sha256 and keys.

    Raises:
        ModelError: file or sidecar missing, checksum mismatch, or keys/shapes that do not fit.
    """
    from safetensors.torch import load_file

    from promptmid.errors import ModelError
    from promptmid.models.weights import load_state_dict_checked, sha256_file

    path = Path(path)
    sidecar = Path(str(path) + ".json")
    if not path.is_file():
        raise ModelError(f"aggregator weights {path} not found")
    if not sidecar.is_file():
        raise ModelError(f"aggregator weights {path} have no sidecar {sidecar.name} (config and sha256)")
    try:
        meta = json.loads(sidecar.read_text())
        conf, expected = meta["config"], meta["sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"unreadable aggregator sidecar {sidecar}: {exc}") from None
    got = sha256_file(path)
    if got != expected:
        raise ModelError(f"checksum mismatch for aggregator weights {path}: expected sha256 {expected} "
                         f"(from {sidecar.name}), got {got}; the file is damaged or was replaced")
    try:
        module = PromptMIDAggregator(**conf)
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
        raise ModelError(f"cannot load aggregator weights {path}: {exc}") from None
    load_state_dict_checked(module, {k: v.float() for k, v in state.items()}, str(path))
    return module.to(device).eval(), meta


def load_aggregator(name: str, path: str | None = None, device: str = "cpu") -> TrainedAggregator:
    """A trained aggregator by name (shipped weights, :data:`SHIPPED`) or from ``path``.

    Raises:
        ValueError: unknown name without a ``path``.
        ModelError: see :func:`load_aggregator_file`.
    """
    if path is None:
        if name not in SHIPPED:
            raise ValueError(f"Unknown aggregator {name!r}; valid: concat, {', '.join(SHIPPED)} (or give a path)")
        path = str(WEIGHTS_DIR / SHIPPED[name])
    module, meta = load_aggregator_file(path, device)
    if path == str(WEIGHTS_DIR / SHIPPED.get(name, "")) and meta["sha256"] != SHIPPED_SHA256[name]:
        from promptmid.errors import ModelError

        raise ModelError(f"shipped aggregator {name} was replaced: sha256 {meta['sha256']} is not the released "
                         f"{SHIPPED_SHA256[name]}; reinstall promptmid")
    return TrainedAggregator(module, name, meta)
