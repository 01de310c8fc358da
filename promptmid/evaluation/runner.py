"""Run methods x pairs: matches from each method, then the shared robust fits and metrics.

For every pair the images are read once (:func:`promptmid.io.load_image`, long side <= 1024 px), every
method is run on them, and its matches (original pixels) are fitted with :func:`fit_geometry` for each
geometry model (affine and homography by default, inlier threshold 3 SAR px). One row per
pair x method x model; a pair that fails (unreadable image, method error, too few matches/inliers)
is a row with ``status`` ``"error"`` or ``"failed"`` and its ``reason``, never dropped.

Raw matches can be cached per (method, pair) in ``cache_dir`` (``.npz``), which makes runs resumable:
cached pairs are not matched again, only re-fitted. Each entry records the method's settings fingerprint
(:func:`promptmid.evaluation.methods.settings_fingerprint`); an entry written under other settings (e.g. before a
preset changed) is recomputed and overwritten. Entries from before fingerprints were recorded are reused as they are.

Methods may also return transform ``hypotheses`` (the area search, :mod:`promptmid.evaluation.area`); the
``+refine`` rows then go through :func:`promptmid.selection.choose` with them, exactly as the Matcher does, and record
which candidate was kept (``hypothesis``) and how close the best candidate came (``best_candidate_rmse``).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from promptmid.evaluation import metrics
from promptmid.evaluation.manifest import Pair
from promptmid.evaluation.perturb import Perturbation, perturb_pair
from promptmid.evaluation.pipeline import cpu_name, git_revision
from promptmid.geometry import Size
from promptmid.evaluation.split import SPLIT_TEXT, split_group
from promptmid.io import PreparedImage, load_image
from promptmid.matching import fit_geometry


@dataclass
class EvalConfig:
    """Settings of one evaluation run.

    Attributes:
        methods: registry names (:mod:`promptmid.evaluation.methods`).
        rotations: SAR rotations searched by methods that are not rotation-invariant (deg).
        models: geometry models fitted to every method's matches.
        threshold: inlier threshold of the robust fit and correctness threshold of NCM (SAR px).
        min_inliers: fewer inliers = failed fit.
        max_side: working resolution of the images given to the methods (px, long side).
        cache_dir: per (method, pair) cache of raw matches, or ``None``.
        threads: torch threads per process (``None`` = torch default).
        refine: also report every fit after area-based refinement (:mod:`promptmid.refine`), as
            model ``"<model>+refine"``; the same refinement for every method.
        perturb: displace every pair's SAR image by a seeded random transform and compose the GT
            (:mod:`promptmid.evaluation.perturb`); ``None`` = the pairs as they are (aligned protocol).
    """

    methods: list[str]
    rotations: list[float] = field(default_factory=lambda: [0.0])
    models: tuple[str, ...] = ("affine", "homography")
    threshold: float = metrics.EPSILON
    min_inliers: int = 6
    max_side: int = 1024
    cache_dir: str | None = None
    threads: int | None = None
    refine: bool = True
    perturb: Perturbation | None = None

    @property
    def protocol(self) -> str:
        """``"aligned"`` or the perturbation tag (e.g. ``"p0-standard"``)."""
        return "aligned" if self.perturb is None else self.perturb.tag


_METHOD_CACHE: dict[tuple[str, tuple[float, ...]], Any] = {}


def get_method(name: str, rotations: list[float]) -> Any:
    """Build a method once per process (models are loaded on first use)."""
    from promptmid.evaluation.methods import build_method, rotations_for

    key = (name, tuple(rotations_for(name, rotations)))
    if key not in _METHOD_CACHE:
        _METHOD_CACHE[key] = build_method(name, list(key[1]))
    return _METHOD_CACHE[key]


class PeakMemory:
    """Peak resident memory increase (MB) during a block, sampled every ``interval`` s from /proc.

    Torch CPU allocations are invisible to ``tracemalloc``, hence RSS sampling; short spikes
    between samples can be missed. ``peak_mb`` is NaN where /proc is unavailable.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_mb = float("nan")
        self._stop = threading.Event()

    @staticmethod
    def rss_mb() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return float("nan")

    def __enter__(self) -> "PeakMemory":
        self._base = self._peak = self.rss_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self.rss_mb())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self.rss_mb())
        self.peak_mb = self._peak - self._base


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def cache_path(cache_dir: str, method: str, rotations: list[float], pair_id: str, protocol: str = "aligned") -> Path:
    """``cache_dir/<method>__r<angles>[__<protocol>]/<pair id>.npz`` (the aligned protocol has no suffix)."""
    rot = "-".join(f"{a:g}" for a in rotations)
    suffix = "" if protocol == "aligned" else f"__{protocol}"
    return Path(cache_dir) / f"{method}__r{rot}{suffix}" / f"{_safe(pair_id)}.npz"


def run_method(name: str, optical: PreparedImage, sar: PreparedImage, conf: EvalConfig) -> dict[str, Any]:
    """Matches of one method on one pair: the method's dict plus ``peak_mem_mb``; errors become
    ``{"error": "Type: message"}`` with empty matches."""
    from promptmid.evaluation.methods import rotations_for

    fn = get_method(name, conf.rotations)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = fn(optical, sar)
        wall = time.perf_counter() - t0
    out["timings"] = {**out.get("timings", {}), "method_total": wall}
    out["peak_mem_mb"] = mem.peak_mb
    out["rotations"] = rotations_for(name, conf.rotations)
    return out


def _load_cached(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(str(z["info"]))
            return {"points0": z["points0"], "points1": z["points1"], "scores": z["scores"], **info}
    except (OSError, ValueError, KeyError):
        return None  # damaged cache entry: recompute


def _save_cached(path: Path, out: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {k: v for k, v in out.items() if k not in ("points0", "points1", "scores")}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, points0=np.asarray(out["points0"], np.float64), points1=np.asarray(out["points1"], np.float64),
             scores=np.asarray(out["scores"], np.float32), info=json.dumps(info, default=float))
    os.replace(tmp, path)


def matches_for(name: str, pair: Pair, images: tuple[PreparedImage, PreparedImage] | None, load_error: str,
                conf: EvalConfig) -> dict[str, Any]:
    """Cached or fresh matches of ``name`` on ``pair``; never raises for a method failure.

    A composite method (``MethodSpec.parts``) gets the matches of its first part and the ``hypotheses`` of the
    others (each part cached on its own; their ``source`` set by the part, :func:`area_source`), with the parts'
    timings added up."""
    from promptmid.evaluation.area import area_source
    from promptmid.evaluation.methods import METHODS, rotations_for, settings_fingerprint

    parts = METHODS[name].parts
    if parts:
        outs = [matches_for(p, pair, images, load_error, conf) for p in parts]
        out = {**outs[0], "hypotheses": [{**h, "source": area_source(METHODS[p])} for p, o in zip(parts[1:], outs[1:])
                                         for h in o.get("hypotheses", [])]}
        out["error"] = next((o["error"] for o in outs if o.get("error")), None)
        out["timings"] = {k: sum(o.get("timings", {}).get(k, 0.0) for o in outs) for k in ("features", "matching")}
        out["peak_mem_mb"] = max(o.get("peak_mem_mb", float("nan")) for o in outs)
        return out

    path = (cache_path(conf.cache_dir, name, rotations_for(name, conf.rotations), pair.id, conf.protocol)
            if conf.cache_dir else None)
    settings = settings_fingerprint(name) if path else None
    cached = _load_cached(path) if path else None
    if cached is not None and cached.get("settings", settings) == settings:
        return cached
    if images is None:
        return {"points0": np.zeros((0, 2)), "points1": np.zeros((0, 2)), "scores": np.zeros(0), "error": load_error}
    try:
        out = run_method(name, images[0], images[1], conf)
    except Exception as exc:  # noqa: BLE001 - a method failure is a result, recorded with its reason
        if os.environ.get("PROMPTMID_DEBUG"):
            traceback.print_exc()
        out = {"points0": np.zeros((0, 2)), "points1": np.zeros((0, 2)), "scores": np.zeros(0),
               "error": f"{type(exc).__name__}: {exc}"}
        return out  # errors are not cached: they are retried next time
    if path:
        _save_cached(path, {**out, "settings": settings})
    return out


def fit_rows(pair: Pair, name: str, out: dict[str, Any], images: tuple[PreparedImage, PreparedImage] | None,
             conf: EvalConfig) -> list[dict[str, Any]]:
    """One row per geometry model (and per model + refinement): fit, metrics, timings.

    The ``+refine`` rows go through the QC stage like :class:`~promptmid.api.Matcher` does (refinement kept
    only when it agrees with the keypoint evidence) and carry the verdict: ``qc_status``, ``qc_confidence``
    and every piece of evidence as ``qc_<name>``.
    """
    from promptmid.config import DEFAULTS
    from promptmid.evaluation.area import kept_hypotheses
    from promptmid.search import Hypothesis

    hyps = kept_hypotheses([Hypothesis.from_dict(h) for h in out.get("hypotheses", [])], DEFAULTS["search"]["top_k"])
    rows = []
    for model in conf.models:
        t0 = time.perf_counter()
        geom = None if out.get("error") else fit_geometry(out["points0"], out["points1"], model, conf.threshold,
                                                          conf.min_inliers)
        t_fit = time.perf_counter() - t0
        plain = geom.matrix if geom is not None and geom.ok else (hyps[0].matrix if hyps else None)
        rows.append(_row(pair, name, model, out, geom, plain, t_fit, images))
        if conf.refine:
            t0 = time.perf_counter()
            chosen, candidates = product_choice(geom, out, hyps, images, conf.threshold)
            t_ref = t_fit + time.perf_counter() - t0
            rows.append(_row(pair, name, f"{model}+refine", out, geom, None if chosen is None else chosen.transform,
                             t_ref, images))
            rows[-1].update(qc_columns(chosen, geom))
            if hyps:
                rows[-1].update(candidate_columns(pair, chosen, candidates, images))
    return rows


def product_choice(geom: Any, out: dict[str, Any], hyps: list[Any],
                   images: tuple[PreparedImage, PreparedImage] | None, threshold: float) -> tuple[Any, list[Any]]:
    """The QC stage as the product runs it (:func:`promptmid.selection.choose`): the fit (refined when the evidence
    agrees) and the area hypotheses, which are left out when the fit alone is ``ok`` and the default config skips the
    search then (``search.skip_when_ok``); returns ``(chosen candidate or None, every candidate)``."""
    from promptmid.config import DEFAULTS
    from promptmid.matching import Geometry
    from promptmid.selection import choose, keypoint_candidate, settled

    if images is None or (geom is None and not hyps):
        return None, []
    geom = geom if geom is not None else Geometry(None, np.zeros(0, bool), reason=out.get("error") or "")
    refine_conf = {k: v for k, v in DEFAULTS["refine"].items() if k != "enabled"}
    keypoint = keypoint_candidate(images[0], images[1], out["points0"], out["points1"],
                                  np.asarray(out["scores"], np.float64), geom, refine_conf, threshold)
    if DEFAULTS["search"]["skip_when_ok"] and settled(keypoint):
        hyps = []
    return choose(images[0], images[1], keypoint, hyps, refine_conf, geom.model)


def candidate_columns(pair: Pair, chosen: Any, candidates: list[Any],
                      images: tuple[PreparedImage, PreparedImage] | None) -> dict[str, Any]:
    """``hypothesis`` (the chosen source), ``best_candidate_rmse`` (the best any candidate achieved against the
    truth: how good the pick could have been) and ``candidates`` (source:confidence:rmse; rmse against the truth)."""
    truth = pair.gt_transform()
    if truth is None or not candidates:
        return {"hypothesis": None if chosen is None else chosen.source}
    size = _optical_size(pair, images)
    errs = [metrics.transform_rmse(c.transform, truth, size, pair.points) for c in candidates]
    return {"hypothesis": chosen.source, "best_candidate_rmse": float(min(errs)),
            "candidates": ";".join(f"{c.source}:{c.verdict.confidence:.3f}:{e:.1f}" for c, e in zip(candidates, errs))}


def qc_columns(chosen: Any, geom: Any) -> dict[str, Any]:
    """``qc_status``, ``qc_confidence`` and ``qc_<evidence>`` of a row: the verdict of the chosen candidate
    (:class:`promptmid.selection.Candidate`) exactly as the product reports it (an area hypothesis without agreeing
    refinement blocks capped at ``uncertain``, a failed candidate that the pick rescued made ``uncertain``), or the
    failed verdict of no fit when ``chosen`` is ``None``."""
    from promptmid.qc import no_transform

    if chosen is None:
        verdict = no_transform("" if geom is None else geom.reason)
        return {"qc_status": verdict.status, "qc_confidence": verdict.confidence}
    return {**{f"qc_{k}": v for k, v in chosen.evidence.items()}, "qc_status": chosen.verdict.status,
            "qc_confidence": chosen.verdict.confidence}


def _row(pair: Pair, name: str, model: str, out: dict[str, Any], geom: Any, estimated: np.ndarray | None,
         t_fit: float, images: tuple[PreparedImage, PreparedImage] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"pair": pair.id, "source": pair.source, "group": split_group(pair),
                           "gt_quality": pair.gt_quality, "method": name, "model": model}
    truth = pair.gt_transform()
    row["status"] = "error" if out.get("error") else ("ok" if estimated is not None else "failed")
    row["reason"] = out.get("error") or (geom.reason if geom is not None else "")
    if truth is None:
        row.update(status="error", reason="no GT transform (need H or >= 3 check points)")
    else:
        row.update(metrics.pair_metrics(truth, out["points0"], out["points1"], estimated,
                                        None if geom is None else geom.inliers, _optical_size(pair, images),
                                        pair.points, metrics.EPSILON))
    t = out.get("timings", {})
    row.update(time_features=t.get("features", float("nan")), time_matching=t.get("matching", float("nan")),
               time_fitting=t_fit)
    row["time_total"] = row["time_features"] + row["time_matching"] + t_fit
    row["peak_mem_mb"] = out.get("peak_mem_mb", float("nan"))
    row["rotation_deg"] = out.get("rotation_deg", 0.0)
    row["transform"] = None if estimated is None else np.asarray(estimated).tolist()
    return row


def _optical_size(pair: Pair, images: tuple[PreparedImage, PreparedImage] | None) -> Size:
    if images is not None:
        return images[0].original_size
    size = pair.meta.get("optical_size")
    return Size(int(size[0]), int(size[1])) if size else Size(1, 1)


def evaluate_pair(pair: Pair, conf: EvalConfig) -> list[dict[str, Any]]:
    """All rows of one pair (every method x model); with ``conf.perturb`` the pair is displaced first."""
    images, load_error = None, ""
    try:
        pair, sar = perturb_pair(pair, conf.perturb)
        images = (load_image(pair.optical, "optical", max_side=conf.max_side),
                  load_image(sar, "sar", max_side=conf.max_side))
    except Exception as exc:  # noqa: BLE001 - recorded as the reason of every row of this pair
        load_error = f"image error: {type(exc).__name__}: {exc}"
    rows = []
    for name in conf.methods:
        out = matches_for(name, pair, images, load_error, conf)
        rows.extend(fit_rows(pair, name, out, images, conf))
    return rows


def _init_worker(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
    import cv2

    cv2.setNumThreads(threads or 1)


def evaluate(pairs: list[Pair], conf: EvalConfig, workers: int = 1,
             progress: Callable[[Pair], None] | None = None) -> list[dict[str, Any]]:
    """Rows of every pair x method x model, in the order of ``pairs``.

    ``workers > 1`` runs pairs in parallel processes (spawned; each loads the models once).
    ``progress`` is called after each finished pair.
    """
    results: dict[str, list[dict[str, Any]]] = {}
    if workers <= 1:
        _init_worker(conf.threads)
        for pair in pairs:
            results[pair.id] = evaluate_pair(pair, conf)
            if progress:
                progress(pair)
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(conf.threads,)) as ex:
            futures = {ex.submit(evaluate_pair, pair, conf): pair for pair in pairs}
            for fut in as_completed(futures):
                pair = futures[fut]
                results[pair.id] = fut.result()
                if progress:
                    progress(pair)
    return [row for pair in pairs for row in results[pair.id]]


def config_dict(conf: EvalConfig) -> dict[str, Any]:
    return asdict(conf)


def header_lines(title: str, conf: EvalConfig, pairs: list[Pair], workers: int) -> list[str]:
    """Provenance lines on top of every summary."""
    import torch

    rot = ", ".join(f"{a:g}" for a in conf.rotations)
    return [
        f"# {title}", "",
        f"- date: {datetime.date.today().isoformat()}; promptmid git {git_revision(Path(__file__).parent)}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, "
        f"{conf.threads or torch.get_num_threads()} threads per process, {workers} worker process(es)",
        f"- pairs: {len(pairs)} from sources {', '.join(sorted({p.source for p in pairs}))}",
        f"- {SPLIT_TEXT}",
        f"- geometry: {', '.join(conf.models)} fits (OpenCV USAC MAGSAC, threshold {conf.threshold:g} SAR px, "
        f"min {conf.min_inliers} inliers); images at long side <= {conf.max_side} px; "
        f"rotation search [{rot}] deg for methods that are not rotation-invariant (sift-ratio, rift are).",
        f"- protocol: {'aligned (pairs as they are; says nothing about displaced pairs)' if conf.perturb is None else conf.perturb.describe()}",
    ]


def run_and_report(pairs: list[Pair], conf: EvalConfig, out_dir: Path, workers: int = 1, figures: bool = True,
                   title: str = "promptmid eval", progress: Callable[[Pair], None] | None = None) -> dict[str, Any]:
    """Evaluate ``pairs`` and write ``pairs.csv``, ``summary.md``, ``summary.json`` (+ figures) to ``out_dir``."""
    from promptmid.evaluation.report import write_figures, write_summary

    rows = evaluate(pairs, conf, workers, progress)
    summary = write_summary(rows, out_dir, header_lines(title, conf, pairs, workers), config_dict(conf))
    if figures:
        from promptmid.evaluation.html_report import write_summary_html

        by_id = {p.id: p for p in pairs}
        write_figures(rows, by_id, out_dir, conf.perturb)
        write_summary_html(rows, by_id, out_dir, conf.perturb, title)
    return {"rows": rows, "summary": summary}
