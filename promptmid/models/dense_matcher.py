"""A coarse dense matcher on frozen DINOv2 tokens: one transform hypothesis per pair (the RoMa/LoFTR route, sized
for a CPU).

Both images are seen by DINOv2-S/14 at :data:`BACKBONE` ``long_side`` px with position-free patch embeddings
(``position="mean"``: a token does not know where it sits in its frame, so correlation cannot peak at "same place in
the frame"); blocks 8 and 12 are L2-normalised per token and concatenated. A small trained head
(:class:`DenseMatcher`: a projection with a modality embedding, then self- and cross-attention layers) turns the
tokens of both images into descriptors; every optical cell is correlated with every SAR cell and the dual softmax
(row softmax x column softmax) gives the probability that two cells match. Mutual best cells above a probability
threshold are the coarse matches; a robust affine fit (OpenCV USAC/MAGSAC) of their cell centres is the hypothesis,
which the pick refines and judges like any area hypothesis (:func:`promptmid.selection.choose`).

Coordinates: (x, y) pixels, pixel centres at integers; a cell ``(i, j)`` of a ``gh x gw`` grid over a ``W x H`` image
has its centre at ``((j + 0.5) W / gw - 0.5, (i + 0.5) H / gh - 0.5)``. Hypotheses map ORIGINAL optical px to
ORIGINAL SAR px, as :class:`promptmid.search.Hypothesis`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from promptmid.errors import ModelError
from promptmid.geometry import apply_transform
from promptmid.io import image_tensor

if TYPE_CHECKING:
    from promptmid.io import PreparedImage
    from promptmid.search import Hypothesis

BACKBONE: dict[str, Any] = {"layers": [8, 12], "long_side": 224, "position": "mean"}
GRADIENT_BINS = 4  # per cell: 9 oriented-gradient magnitudes pooled over GRADIENT_BINS x GRADIENT_BINS sub-cells
# No weights are shipped (trained on 2 CPUs the head found no usable matches: docs/results.md); a file trained with
# ``python -m promptmid.training.dense_matcher`` is passed by path (``search.dense``).
MIN_MATCHES = 8  # fewer mutual matches (or MAGSAC inliers) than this: no hypothesis


class Backbone:
    """What the matcher reads per cell of a DINOv2 token grid: ``[1, C, h, w]`` float32, the tokens of
    :data:`BACKBONE`'s blocks (frozen DINOv2, each block L2-normalised per token) and, with ``gradient_bins``, a
    HOG-like cell descriptor (:func:`gradient_cells`) stacked after them."""

    def __init__(self, gradient_bins: int = GRADIENT_BINS, **conf: Any) -> None:
        from promptmid.models.vfm import DINOv2Features

        self.features = DINOv2Features(**{**BACKBONE, **conf})
        self.gradient_bins = gradient_bins

    def __call__(self, image: PreparedImage) -> torch.Tensor:
        x = image_tensor(image)
        maps = [F.normalize(m, dim=1) for m in self.features.feature_maps(x).values()]
        if self.gradient_bins:
            maps.append(gradient_cells(image.image.mean(-1), maps[0].shape[-2:], self.gradient_bins))
        return torch.cat(maps, dim=1)


def gradient_cells(gray: np.ndarray, grid: tuple[int, int], bins: int, orientations: int = 9) -> torch.Tensor:
    """``[1, orientations * bins**2, gh, gw]``: the oriented-gradient magnitudes of ``gray`` (:func:`promptmid.dense.
    oriented_gradient_features`, not normalised per pixel) averaged over ``bins x bins`` sub-cells of each cell of
    ``grid``, L2-normalised per cell (a HOG-like descriptor: edge directions agree across optical and SAR)."""
    from promptmid.dense import oriented_gradient_features

    gh, gw = int(grid[0]), int(grid[1])
    feats = oriented_gradient_features(gray, orientations, 1.0, normalise=False)
    pooled = np.stack([cv2.resize(f, (gw * bins, gh * bins), interpolation=cv2.INTER_AREA) for f in feats])
    cells = pooled.reshape(orientations, gh, bins, gw, bins).transpose(0, 2, 4, 1, 3).reshape(-1, gh, gw)
    return F.normalize(torch.from_numpy(np.ascontiguousarray(cells))[None], dim=1)


def cell_validity(valid: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[gh, gw]`` bool: cells of a ``valid`` ``[H, W]`` mask with at least half of their pixels valid."""
    share = cv2.resize(valid.astype(np.float32), (int(grid[1]), int(grid[0])), interpolation=cv2.INTER_AREA)
    return share >= 0.5


def cell_centres(grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """``[gh * gw, 2]`` (x, y) px centres of the cells of a ``grid`` (gh, gw) over an image of ``size`` (W, H),
    row-major."""
    gh, gw = grid
    xs = (np.arange(gw) + 0.5) * size[0] / gw - 0.5
    ys = (np.arange(gh) + 0.5) * size[1] / gh - 0.5
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)


class _Layer(nn.Module):
    """Self-attention in each image, then cross-attention between them (pre-norm, shared weights), then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, pad0: torch.Tensor, pad1: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h0, h1 = self.norm1(x0), self.norm1(x1)
        x0 = x0 + self.self_attn(h0, h0, h0, key_padding_mask=pad0, need_weights=False)[0]
        x1 = x1 + self.self_attn(h1, h1, h1, key_padding_mask=pad1, need_weights=False)[0]
        h0, h1 = self.norm2(x0), self.norm2(x1)
        x0, x1 = (x0 + self.cross_attn(h0, h1, h1, key_padding_mask=pad1, need_weights=False)[0],
                  x1 + self.cross_attn(h1, h0, h0, key_padding_mask=pad0, need_weights=False)[0])
        return x0 + self.mlp(self.norm3(x0)), x1 + self.mlp(self.norm3(x1))


class DenseMatcher(nn.Module):
    """Descriptors of the cells of an optical and a SAR token grid, and their log dual-softmax matching scores.

    Args:
        in_dim: channels of the backbone tokens.
        dim: width of the head.
        layers: self + cross attention layers.
        heads: attention heads.
        temperature: of the dual softmax over cosine similarities.
    """

    def __init__(self, in_dim: int = 768 + 9 * GRADIENT_BINS ** 2, dim: int = 128, layers: int = 2, heads: int = 4,
                 temperature: float = 0.03) -> None:
        super().__init__()
        self.config = {"in_dim": in_dim, "dim": dim, "layers": layers, "heads": heads, "temperature": temperature}
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.modality = nn.Parameter(torch.zeros(2, dim))
        self.layers = nn.ModuleList(_Layer(dim, heads) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, tokens0: torch.Tensor, tokens1: torch.Tensor, valid0: torch.Tensor, valid1: torch.Tensor
                ) -> torch.Tensor:
        """``[1, C, h0, w0]`` optical and ``[1, C, h1, w1]`` SAR tokens, ``[h, w]`` bool validity of their cells ->
        ``[N0, N1]`` log matching probabilities (row-major cells; invalid cells -inf)."""
        x0 = self.proj(tokens0.float().flatten(2).transpose(1, 2)) + self.modality[0]
        x1 = self.proj(tokens1.float().flatten(2).transpose(1, 2)) + self.modality[1]
        pad0, pad1 = ~valid0.reshape(1, -1), ~valid1.reshape(1, -1)
        for layer in self.layers:
            x0, x1 = layer(x0, x1, pad0, pad1)
        d0, d1 = F.normalize(self.out(x0)[0], dim=-1), F.normalize(self.out(x1)[0], dim=-1)
        sim = (d0 @ d1.T) / self.config["temperature"]
        sim = sim.masked_fill(pad0[0][:, None] | pad1[0][None, :], float("-inf"))
        return _finite(F.log_softmax(sim, 1)) + _finite(F.log_softmax(sim, 0))


def _finite(x: torch.Tensor) -> torch.Tensor:
    """-inf (and the NaN of an all -inf softmax) kept as -inf, so masked cells never match."""
    return torch.nan_to_num(x, nan=float("-inf"))


def mutual_matches(log_p: torch.Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells that are each other's best match with probability above ``threshold``: optical cell indices, SAR cell
    indices, probabilities (numpy)."""
    p = log_p.exp()
    best1 = p.argmax(1)
    best0 = p.argmax(0)
    idx0 = torch.arange(p.shape[0])
    keep = (best0[best1] == idx0) & (p[idx0, best1] > threshold)
    return idx0[keep].numpy(), best1[keep].numpy(), p[idx0, best1][keep].detach().numpy()


def save_matcher(model: DenseMatcher, path: Path, info: dict[str, Any]) -> str:
    """Write ``path`` (safetensors) and its sidecar ``path.json`` (config, sha256, training info); returns the
    sha256, which :func:`load_matcher` checks against the sidecar."""
    from safetensors.torch import save_file

    from promptmid.models.weights import sha256_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    sha = sha256_file(path)
    meta = {"format": "promptmid-dense/1", "config": model.config, "backbone": BACKBONE, "file": path.name,
            "sha256": sha, **info}
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=1) + "\n")
    return sha


def load_matcher(path: str | Path) -> DenseMatcher:
    """The trained matcher from ``path`` (:func:`save_matcher`), its sha256 checked against the sidecar and every key
    and shape checked.

    Raises:
        ModelError: file or sidecar missing, checksum mismatch, or keys/shapes that do not fit.
    """
    from safetensors.torch import load_file

    from promptmid.models.weights import load_checked, sha256_file

    file = Path(path)
    sidecar = Path(str(file) + ".json")
    if not file.is_file() or not sidecar.is_file():
        raise ModelError(f"dense matcher weights {file} (and its sidecar {sidecar.name}) not found; none are shipped: "
                         "train them with python -m promptmid.training.dense_matcher")
    try:
        meta = json.loads(sidecar.read_text())
        config = dict(meta["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"unreadable dense matcher sidecar {sidecar}: {exc}") from None
    got = sha256_file(file)
    if got != meta.get("sha256"):
        raise ModelError(f"dense matcher weights {file} have sha256 {got[:16]}..., expected "
                         f"{str(meta.get('sha256'))[:16]}... (sidecar); the file is damaged or was replaced")
    model = DenseMatcher(**config)
    load_checked(model, load_file(str(file)), f"dense matcher {file.name}")
    return model.eval()


class DenseHypotheses:
    """The dense matcher as a hypothesis source: ``(optical, sar) -> [Hypothesis]`` (at most one).

    Args:
        path: weights (:func:`save_matcher`).
        threshold: least dual-softmax probability of a mutual match.
        ransac_cells: MAGSAC inlier threshold in cells of the SAR grid.
    """

    name = "dense"

    def __init__(self, path: str | Path, threshold: float = 0.2, ransac_cells: float = 1.0) -> None:
        self.model = load_matcher(path)
        self.backbone = Backbone()
        self.threshold = threshold
        self.ransac_cells = ransac_cells

    @torch.no_grad()
    def __call__(self, optical: PreparedImage, sar: PreparedImage, rotations: Sequence[float] = (0.0,)
                 ) -> list[Hypothesis]:
        """At most one hypothesis: the best-scoring fit over the SAR image turned by each of ``rotations`` (deg,
        counter-clockwise; the matcher itself covers about +-15 deg)."""
        from promptmid.io import rotate_prepared

        t0 = self.backbone(optical)
        v0 = torch.from_numpy(cell_validity(optical.valid, t0.shape[-2:]))
        found: list[Hypothesis] = []
        for angle in rotations:
            turned, to_sar = rotate_prepared(sar, angle)
            t1 = self.backbone(turned)
            log_p = self.model(t0, t1, v0, torch.from_numpy(cell_validity(turned.valid, t1.shape[-2:])))
            i0, i1, prob = mutual_matches(log_p, self.threshold)
            p0 = cell_centres(t0.shape[-2:], _size(optical))[i0]
            p1 = apply_transform(to_sar, cell_centres(t1.shape[-2:], _size(turned))[i1])
            cell = max(sar.original_size) / max(t1.shape[-2:])
            found += fit_hypothesis(optical, sar, p0, p1, prob, self.ransac_cells * cell)
        return sorted(found, key=lambda h: -h.score)[:1]


def fit_hypothesis(optical: PreparedImage, sar: PreparedImage, p0: np.ndarray, p1: np.ndarray, prob: np.ndarray,
                   threshold_px: float) -> list[Hypothesis]:
    """The affine fit (:func:`promptmid.matching.fit_geometry`, USAC/MAGSAC, ``threshold_px`` ORIGINAL SAR px, at
    least :data:`MIN_MATCHES` inliers) of matched points (optical and SAR working px) as a one-item list of
    :class:`promptmid.search.Hypothesis` (ORIGINAL px), or ``[]``. Score: the share of matches that are inliers
    times their mean probability."""
    from promptmid.matching import fit_geometry
    from promptmid.search import Hypothesis, prior_scale_of

    fit = fit_geometry(optical.to_original(p0), sar.to_original(p1), "affine", threshold_px, min_inliers=MIN_MATCHES)
    if fit.matrix is None:
        return []
    lin = fit.matrix[:2, :2]
    angle = float(np.degrees(np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1])))
    score = float(fit.inliers.mean() * prob[fit.inliers].mean())
    # as the area search's: SAR px per optical px with both reduced to the same long side, relative to the prior
    same_side = max(optical.original_size) / max(sar.original_size)
    scale = float(np.sqrt(abs(np.linalg.det(lin)))) * same_side / prior_scale_of(optical, sar)
    return [Hypothesis(fit.matrix, score, 0.0, angle, scale, "dense")]


def _size(image: PreparedImage) -> tuple[int, int]:
    return image.image.shape[1], image.image.shape[0]
