"""Training data for the aggregator: manifest pairs with GT, augmented views, a feature cache.

Backbones are frozen, so what the aggregator needs from an image is only the per-keypoint
output of the keypoint extractor and of the feature sources (:func:`describe_sources`).
That is computed once per image *view* and cached on disk; an epoch then only runs the
aggregator (seconds).

A *view* of a pair is an optical image and a SAR image. The SAR image gets

1. the 90-degree rotation step that the Matcher's rotation search would pick for it
   (:func:`best_rotation_step`, exactly :func:`promptmid.io.rotate_prepared`), and, for
   augmented views,
2. a random affine/homography warp (residual rotation, scale, shear, shift, perspective)
   composed with the GT, and SAR-like radiometry (speckle, gamma, contrast, blur).

With ``independent=True`` (the default of ``promptmid train``) every view is augmented and the
optical image gets its own random warp (shift up to 15 % of the size, rotation, scale, shear) and
photometric jitter too, so that where a pixel sits in its image never predicts its correspondence:
a descriptor cannot learn image position from such views.

The GT of every view is kept as ``H`` mapping optical *working-resolution* pixels to
SAR-view pixels (x, y; pixel centres at integers). Random warps are drawn when the cache is
built (``views`` per pair, seeded), because the backbones cost ~1 s per image on this CPU.

Splits follow ``../shared/data/optsar/README.md`` (:func:`split_of`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import cv2
import numpy as np
import torch

from promptmid.config import INLIER_THRESHOLD_PX
from promptmid.evaluation.manifest import Pair
from promptmid.evaluation.split import split_group
from promptmid.geometry import Size
from promptmid.geometry import working_transform
from promptmid.io import PreparedImage, load_image

CACHE_VERSION = 3  # 3: sizes stored as (W, H)
ROTATION_STEPS = (0.0, 90.0, 180.0, 270.0)

def read_manifest(path: str | Path) -> list[Pair]:
    """Read a JSON-lines manifest (README, 'Manifest format') with :func:`promptmid.evaluation.manifest.read_manifest`
    (the one manifest reader and record type); every pair must have ``H``, and a line without
    ``gt_quality`` counts as ``"exact"``.

    Raises:
        InputError: a bad line (see the evaluation reader).
        ValueError: a line without ``H`` (point-only GT is not usable for training).
    """
    from promptmid.evaluation.manifest import read_manifest as read_pairs

    records = read_pairs(path)
    for p in records:
        if p.H is None:
            raise ValueError(f"{p.where}: pair {p.id!r} has no 'H'")
        p.meta.setdefault("gt_quality", "exact")
    return records


def data_records(folder: str | Path) -> list[Pair] | None:
    """The records of ``folder/all.jsonl`` (:func:`read_manifest`), or ``None`` after saying on stderr that it is
    missing (for the training scripts' ``--data``: they then exit with status 2)."""
    import sys

    manifest = Path(folder) / "all.jsonl"
    if not manifest.is_file():
        print(f"error: {manifest} not found", file=sys.stderr)
        return None
    return read_manifest(manifest)


def split_of(rec: Any) -> str | None:
    """``"train"``, ``"val"``, ``"test"`` (unseen), ``"near"`` (near-domain test) or ``None``.

    The groups of :func:`promptmid.evaluation.split.split_group` (one definition of the split), for any
    record with ``id`` and ``source``.
    """
    group = split_group(rec)
    if group in ("train", "val", "near"):
        return group
    return "test" if group.startswith("unseen:") else None


def select(records: Iterable[Pair], split: str, qualities: tuple[str, ...] = ("exact", "approx")
           ) -> list[Pair]:
    """Records of one split with GT quality in ``qualities`` (training uses exact/approx only)."""
    return [r for r in records if split_of(r) == split and r.gt_quality in qualities]


# --------------------------------------------------------------------------- geometry


def working_gt(rec_H: np.ndarray, opt: PreparedImage, sar: PreparedImage) -> np.ndarray:
    """GT mapping optical working px -> SAR working px."""
    return working_transform(rec_H, opt, sar)


def rotation_angle(H: np.ndarray) -> float:
    """Rotation (deg) of the linear part of ``H`` (image axes, y down)."""
    return float(np.degrees(np.arctan2(H[1, 0] - H[0, 1], H[0, 0] + H[1, 1])))


def best_rotation_step(sar: PreparedImage, H: np.ndarray) -> float:
    """The step of :data:`ROTATION_STEPS` after which the SAR is closest to upright w.r.t. optical."""
    from promptmid.io import rotate_prepared

    best, best_err = 0.0, np.inf
    for angle in ROTATION_STEPS:
        _, to_sar = rotate_prepared(sar, angle)
        err = abs(rotation_angle(np.linalg.inv(to_sar) @ H))
        if err < best_err - 1e-6:
            best, best_err = angle, err
    return best


def random_warp(rng: np.random.Generator, size: Size, max_rot: float = 25.0,
                scale_log: float = 0.25, shear: float = 0.1, shift: float = 0.15, persp: float = 2e-4
                ) -> np.ndarray:
    """Random 3x3 homography about the centre of an image of ``size`` (W, H)."""
    w, h = size
    c = np.array([[1, 0, (w - 1) / 2], [0, 1, (h - 1) / 2], [0, 0, 1.0]])
    a = np.deg2rad(rng.uniform(-max_rot, max_rot))
    s = np.exp(rng.uniform(-scale_log, scale_log))
    sh = rng.uniform(-shear, shear)
    lin = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.array([[1, sh], [0, 1]])
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = rng.uniform(-shift, shift, 2) * np.array([w, h])
    m[2, :2] = rng.uniform(-persp, persp, 2)
    return c @ m @ np.linalg.inv(c)


def sar_radiometry(img: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """SAR-like radiometric augmentation of a ``[H, W]`` image in [0, 1] (each step with p=0.5)."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:  # multiplicative gamma speckle on intensity (x is ~log/display-scaled)
        looks = rng.uniform(1.0, 6.0)
        noise = rng.gamma(looks, 1.0 / looks, x.shape).astype(np.float32)
        x = np.clip(x * np.sqrt(noise), 0, None)
        x = x / max(float(np.percentile(x[valid], 99)) if valid.any() else 1.0, 1e-6)
    if rng.random() < 0.5:
        x = np.clip(x, 0, 1) ** rng.uniform(0.6, 1.6)
    if rng.random() < 0.5:
        m = float(x[valid].mean()) if valid.any() else 0.5
        x = (x - m) * rng.uniform(0.7, 1.4) + m + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.5:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.3, 1.2))
    x = np.clip(x, 0, 1)
    x[~valid] = 0.0
    return x


def optical_photometry(img: np.ndarray, valid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-channel gain/offset and a gamma on a ``[H, W, 3]`` image in [0, 1] (each step with p=0.5)."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x = x * rng.uniform(0.8, 1.2, 3).astype(np.float32) + rng.uniform(-0.08, 0.08, 3).astype(np.float32)
    if rng.random() < 0.5:
        x = np.clip(x, 0, 1) ** rng.uniform(0.7, 1.4)
    x = np.clip(x, 0, 1)
    x[~valid] = 0.0
    return x


def warp_prepared(image: PreparedImage, A: np.ndarray) -> PreparedImage:
    """``image`` (pixels and validity mask) resampled by the 3x3 ``A`` (image px -> new px) on the same canvas."""
    h, w = image.image.shape[:2]
    valid = cv2.warpPerspective(image.valid.astype(np.uint8), A, (w, h), flags=cv2.INTER_NEAREST,
                                borderValue=0).astype(bool)
    img = cv2.warpPerspective(image.image, A, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    return dataclasses.replace(image, image=img, valid=valid)


def make_optical_view(opt: PreparedImage, rng: np.random.Generator) -> tuple[PreparedImage, np.ndarray]:
    """An independently warped optical view and its warp ``A`` (optical working px -> view px)."""
    h, w = opt.image.shape[:2]
    A = random_warp(rng, Size(w, h), max_rot=10.0, scale_log=0.15, shear=0.05, shift=0.15, persp=1e-4)
    view = warp_prepared(opt, A)
    return dataclasses.replace(view, image=optical_photometry(view.image, view.valid, rng)), A


def make_view(sar: PreparedImage, H: np.ndarray, rng: np.random.Generator | None) -> tuple[PreparedImage, np.ndarray]:
    """One SAR view and its GT (optical working px -> view px).

    The Matcher's best 90-degree step is always applied; with ``rng`` a random warp and SAR
    radiometry are added on top (``rng=None``: the plain view the Matcher would see).
    """
    from promptmid.io import rotate_prepared

    rotated, to_sar = rotate_prepared(sar, best_rotation_step(sar, H))
    H_view = np.linalg.inv(to_sar) @ H
    if rng is None:
        return rotated, H_view
    h, w = rotated.image.shape[:2]
    A = random_warp(rng, Size(w, h))
    warped = warp_prepared(rotated, A)
    img = sar_radiometry(warped.image[..., 0], warped.valid, rng)
    return dataclasses.replace(warped, image=np.repeat(img[..., None], 3, axis=-1)), A @ H_view


# --------------------------------------------------------------------------- features


class SourceDescriber:
    """Keypoints + per-source features of one prepared image (the Describer minus aggregation).

    Args:
        conf: a full pipeline config (:func:`promptmid.config.get_config`); its ``keypoints``
            and ``sources`` sections are used.
    """

    def __init__(self, conf: dict[str, Any]) -> None:
        from promptmid.descriptor import Describer

        self.conf = conf
        self.describer = Describer(conf["keypoints"], conf["sources"], {"name": "concat"})

    def begin_pair(self, optical: PreparedImage) -> Any:
        """The pair's context (:meth:`promptmid.descriptor.Describer.begin_pair`: prompted sources choose the
        land-use class once, on the optical image), to pass to every image of the pair as the Matcher does."""
        return self.describer.begin_pair(optical)

    @torch.inference_mode()
    def __call__(self, prepared: PreparedImage, context: Any = None) -> dict[str, Any]:
        """``{"keypoints": [N,2], "scores": [N], "features": {name: [N,C] fp16}, "size": (W, H)}``
        (exactly :meth:`promptmid.descriptor.Describer.features` with the pair's ``context``, stored compactly)."""
        out = self.describer.features(prepared, context)
        return {"keypoints": out["keypoints"].float(), "scores": out["scores"].float(),
                "features": {k: v.half() for k, v in out["features"].items()}, "size": tuple(int(v) for v in out["image_size"])}


def cache_root() -> Path:
    """``<promptmid cache>/train_features``: ``$PROMPTMID_CACHE`` or ``~/.cache/promptmid`` (never inside
    the installed package)."""
    from promptmid.models.weights import cache_dir

    return cache_dir() / "train_features"


def config_key(conf: dict[str, Any], extra: dict[str, Any]) -> str:
    """Short hash of what the cached features depend on."""
    blob = json.dumps({"v": CACHE_VERSION, "io": conf["io"], "kp": conf["keypoints"], "src": conf["sources"],
                       **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class FeatureCache:
    """Cached features of manifest pairs, for training views or Matcher-style evaluation.

    Args:
        conf: full pipeline config (keypoints, sources, io).
        root: cache directory (default :func:`cache_root`).
        describe: a :class:`SourceDescriber`-like callable (built lazily when ``None``).
    """

    def __init__(self, conf: dict[str, Any], root: str | Path | None = None,
                 describe: Callable[[PreparedImage], dict[str, Any]] | None = None) -> None:
        self.conf = conf
        self.root = Path(root) if root is not None else cache_root()
        self._describe = describe

    @property
    def describe(self) -> Callable[[PreparedImage], dict[str, Any]]:
        if self._describe is None:
            self._describe = SourceDescriber(self.conf)
        return self._describe

    def _describer_for(self, optical: PreparedImage) -> Callable[[PreparedImage], dict[str, Any]]:
        """``describe`` bound to the pair's context chosen on ``optical`` (when the describer has one)."""
        begin = getattr(self.describe, "begin_pair", None)
        if begin is None:
            return self.describe
        context = begin(optical)
        return lambda image: self.describe(image, context)

    def _load_pair(self, rec: Pair) -> tuple[PreparedImage, PreparedImage]:
        io = self.conf["io"]
        return load_image(rec.optical, "optical", **io), load_image(rec.sar, "sar", **io)

    def training_pair(self, rec: Pair, views: int, seed: int, independent: bool = True) -> dict[str, Any]:
        """``views`` views of a pair with their GT ``H`` (optical view px -> SAR view px).

        ``independent=False``: one optical image for all views, SAR view 0 un-augmented (the layout of the
        aggregators up to v2). ``independent=True``: every view augmented, each with its own optical view
        (``view["optical"]``), so that image position never predicts correspondence.
        """
        key = config_key(self.conf, {"views": views, "seed": seed, "independent": independent, "pair_context": 1})
        path = self.root / f"train-{key}" / f"{_safe(rec.id)}.pt"
        cached = load_cached(path)
        if cached is not None:
            return cached
        opt, sar = self._load_pair(rec)
        describe = self._describer_for(opt)  # one land-use choice per pair, on the optical image (as the Matcher)
        H = working_gt(rec.H, opt, sar)
        rng = np.random.default_rng([seed, int(hashlib.md5(rec.id.encode()).hexdigest()[:8], 16)])
        out: dict[str, Any] = {"id": rec.id, "optical": None if independent else describe(opt), "views": []}
        for v in range(views):
            view, Hv = make_view(sar, H, rng if independent or v > 0 else None)
            entry = {**describe(view), "H": None}
            if independent:
                opt_view, A = make_optical_view(opt, rng)
                entry["optical"], Hv = describe(opt_view), Hv @ np.linalg.inv(A)
            entry["H"] = torch.from_numpy(Hv)
            out["views"].append(entry)
        save_cached(path, out)
        return out

    def eval_pair(self, rec: Pair, rotations: tuple[float, ...], perturb: Any = None) -> dict[str, Any]:
        """What :class:`promptmid.api.Matcher` computes before aggregation, for each rotation step.

        ``perturb``: a :class:`~promptmid.evaluation.perturb.Perturbation` displacing the SAR image (and
        composing the GT ``H``) exactly as ``promptmid eval --perturb`` does; ``None`` = as given.
        """
        from promptmid.io import rotate_prepared
        from promptmid.evaluation.perturb import warp_raster
        from promptmid.io import read_raster

        key = config_key(self.conf, {"rot": list(rotations), "perturb": None if perturb is None else perturb.tag,
                                     "pair_context": 1})
        path = self.root / f"eval-{key}" / f"{_safe(rec.id)}.pt"
        cached = load_cached(path)
        if cached is not None:
            return cached
        raster, H = read_raster(rec.sar), rec.H
        if perturb is not None:
            T, canvas = perturb.draw(rec.id, raster.size)
            raster, H = warp_raster(raster, T, canvas), T @ rec.H
        opt = load_image(rec.optical, "optical", **self.conf["io"])
        sar = load_image(raster, "sar", **self.conf["io"])
        describe = self._describer_for(opt)
        out: dict[str, Any] = {
            "id": rec.id, "group": rec.group, "H": torch.from_numpy(H),
            "optical": describe(opt), "opt_scale": opt.scale, "sar_scale": sar.scale,
            "optical_size": opt.original_size, "rotations": {},
        }
        for angle in rotations:
            rotated, to_sar = rotate_prepared(sar, float(angle))
            out["rotations"][float(angle)] = {**describe(rotated), "to_sar": torch.from_numpy(to_sar)}
        save_cached(path, out)
        return out


def load_cached(path: Path) -> dict[str, Any] | None:
    """A cache entry (tensors and plain containers only: ``weights_only=True``, no pickle code runs);
    ``None`` when absent or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged or foreign file is recomputed, never executed
        return None


def save_cached(path: Path, entry: dict[str, Any]) -> None:
    """Write a cache entry atomically (a killed run never leaves a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(entry, tmp)
    tmp.replace(path)


def gt_correspondences(kp0: torch.Tensor, kp1: torch.Tensor, H: torch.Tensor, threshold: float = INLIER_THRESHOLD_PX
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives under the GT: mutual nearest keypoints within ``threshold`` px (in image 1).

    Args:
        kp0: ``[N0, 2]`` keypoints of image 0 (optical), kp1: ``[N1, 2]`` of image 1.
        H: 3x3 image-0 -> image-1 px.

    Returns:
        ``pairs [M, 2]`` (i0, i1) and ``dist [N0, N1]`` distances ``|H(kp0) - kp1|`` (px).
    """
    Hf = H.to(torch.float64)
    p = torch.cat([kp0.double(), torch.ones(len(kp0), 1, dtype=torch.float64)], 1) @ Hf.T
    proj = (p[:, :2] / p[:, 2:3]).float()
    dist = torch.cdist(proj, kp1.float())
    if dist.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.long), dist
    d01, j = dist.min(1)
    i_back = dist.argmin(0)
    i = torch.arange(len(kp0))
    keep = (d01 <= threshold) & (i_back[j] == i)
    return torch.stack([i[keep], j[keep]], 1), dist


def test_subset(records: Iterable[Pair], per_figure: int = 4) -> list[Pair]:
    """A fixed, smaller unseen-test set for ablations: the first ``per_figure`` exact/approx tiles of
    each unseen 3MOS figure (sensor x scene) plus every exact/approx pair of the other unseen sources."""
    out, seen = [], {}
    for r in select(records, "test"):
        if r.source == "3mos":
            fig = r.id.split("/")[-1].rsplit("_", 1)[0]
            seen[fig] = seen.get(fig, 0) + 1
            if seen[fig] > per_figure:
                continue
        out.append(r)
    return out


def build_cache(cache: FeatureCache, records: list[Pair], mode: str, views: int = 2, seed: int = 0,
                rotations: tuple[float, ...] = ROTATION_STEPS, progress: bool = True, independent: bool = True,
                perturb: Any = None) -> list[dict[str, Any]]:
    """Fill the cache for ``records`` (``mode`` = "train" or "eval"); returns the loaded entries.

    Pairs that fail to load (unreadable image, no keypoints) are skipped with a warning.
    """
    from rich.progress import Progress

    entries = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"features ({mode})", total=len(records))
        for rec in records:
            try:
                entries.append(cache.training_pair(rec, views, seed, independent) if mode == "train"
                               else cache.eval_pair(rec, rotations, perturb))
            except Exception as exc:  # noqa: BLE001 - one bad pair must not stop a long cache build
                bar.console.print(f"[yellow]skipping {rec.id}: {type(exc).__name__}: {exc}")
            bar.advance(task)
    return entries
