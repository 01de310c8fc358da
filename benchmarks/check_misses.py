"""Check the ground truth before trusting a miss: the default's near misses (5-12 px) on displaced pairs.

For each pair of ``<results>/<run>/pairs.csv`` whose chosen transform (``--method``, affine+refine) is between
``--lo`` and ``--hi`` px RMSE from the ground truth, the candidates are rebuilt exactly as the evaluation did (cached
matches and hypotheses, :func:`promptmid.selection.choose`) and the images' own evidence is taken at the ground truth
and at the chosen transform: the dense oriented-gradient correlation at the transform (``dense_at_zero``) and where
it peaks (``dense_offset_px``, 0 = at the transform), and the mutual-information peak (``mi_peak``,
:func:`promptmid.alignment.mutual_information_evidence`). A miss is flagged **GT suspect** when candidates from two
different kinds of source (keypoints, classical search, search with ALIKED channels) agree within ``AGREE_PX`` of
each other, and the images correlate better at the chosen transform than at the ground truth with the correlation
peak closer to it. Writes ``benchmarks/results/misses_vs_gt.md``.

    .venv/bin/python benchmarks/check_misses.py [--results benchmarks/results/area_search_qc3] [--run unseen]
        [--method promptmid-lite+area-both-trained] [--seed 0] [--lo 5] [--hi 12]

Coordinates: every transform maps optical px to SAR px (original images); distances are mean corner errors (px).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

AGREE_PX = 3.0  # two candidates of different kinds this close (mean corner distance) agree with each other


def near_misses(results: Path, run: str, method: str, lo: float, hi: float) -> list[tuple[str, float]]:
    """``(pair id, RMSE px)`` of the method's affine+refine rows with ``lo < RMSE <= hi``."""
    rows = csv.DictReader(open(results / run / "pairs.csv"))
    out = []
    for r in rows:
        try:
            err = float(r["rmse"])
        except ValueError:
            continue
        if r["method"] == method and r["model"] == "affine+refine" and lo < err <= hi:
            out.append((r["pair"], err))
    return out


def check(pair: Any, method: str, seed: int) -> dict[str, Any]:
    """The candidates of ``method`` on the displaced ``pair`` and the evidence at the truth and at the choice."""
    from promptmid.evaluation.perturb import Perturbation, perturb_pair
    from promptmid.evaluation.runner import EvalConfig, matches_for, product_choice
    from promptmid.geometry import corner_error
    from promptmid.io import load_image
    from promptmid.matching import fit_geometry
    from promptmid.alignment import dense_evidence, mutual_information_evidence
    from promptmid.search import Hypothesis
    from promptmid.selection import origin

    conf = EvalConfig([method], [0.0], models=("affine",), cache_dir=str(ROOT / "benchmarks" / "cache"), threads=1,
                      perturb=Perturbation(seed))
    displaced, sar = perturb_pair(pair, conf.perturb)
    images = (load_image(displaced.optical, "optical", max_side=conf.max_side),
              load_image(sar, "sar", max_side=conf.max_side))
    out = matches_for(method, displaced, images, "", conf)
    geom = fit_geometry(out["points0"], out["points1"], "affine", conf.threshold, conf.min_inliers)
    hyps = [Hypothesis.from_dict(h) for h in out.get("hypotheses", [])]
    chosen, candidates = product_choice(geom, out, hyps, images, conf.threshold)
    truth, size = displaced.gt_transform(), images[0].original_size
    dist = lambda a, b: float(corner_error(a, b, size).mean())  # noqa: E731
    agreeing = sorted({f"{origin(c)} & {origin(d)}" for c in candidates for d in candidates
                       if origin(c) < origin(d) and dist(c.transform, d.transform) <= AGREE_PX})

    def evidence(matrix: np.ndarray) -> dict[str, float]:
        return {**dense_evidence(*images, matrix), **mutual_information_evidence(*images, matrix)}

    return {"pair": pair.id, "quality": getattr(pair, "gt_quality", ""), "chosen": chosen.source,
            "rmse_chosen": dist(chosen.transform, truth), "agreeing": agreeing,
            "at_truth": evidence(truth), "at_chosen": evidence(chosen.transform)}


def suspect(r: dict[str, Any]) -> bool:
    """Independent candidates agree, and the images align better at the choice than at the ground truth."""
    t, c = r["at_truth"], r["at_chosen"]
    return bool(r["agreeing"]) and c["dense_at_zero"] > t["dense_at_zero"] and \
        c["dense_offset_px"] < t["dense_offset_px"]


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def write(rows: list[dict[str, Any]], args: argparse.Namespace) -> Path:
    from common import header_lines

    n = sum(suspect(r) for r in rows)
    md = header_lines("Near misses vs the ground truth") + [
        f"Method `{args.method}`, run `{args.run}` of `{_shown(args.results)}` (displaced, seed {args.seed}): the "
        f"{len(rows)} pairs whose chosen transform is {args.lo:g}-{args.hi:g} px RMSE (check points) from the ground "
        "truth; the table gives its mean corner error. When the keypoint fit is `ok` the search is skipped (one "
        "candidate). "
        f"Agreeing: candidates of two kinds of source within {AGREE_PX:g} px of each other. dense@0 = the dense "
        "oriented-gradient correlation at the transform, offset = where it peaks (px from the transform), MI = the "
        "mutual-information peak (thousandths); each at the ground truth / at the chosen transform. "
        f"**GT suspect on {n} of {len(rows)}**: independent sources agree and the images align better at the choice "
        "than at the ground truth (correlation higher, peak closer).", "",
        "| pair | GT quality | chosen | mean corner error px | agreeing kinds | dense@0 GT / chosen | "
        "offset px GT / chosen | MI GT / chosen | GT suspect |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, c = r["at_truth"], r["at_chosen"]
        md.append(f"| {r['pair']} | {r['quality']} | {r['chosen']} | {r['rmse_chosen']:.1f} | "
                  f"{', '.join(r['agreeing']) or '-'} | {t['dense_at_zero']:.3f} / {c['dense_at_zero']:.3f} | "
                  f"{t['dense_offset_px']:.1f} / {c['dense_offset_px']:.1f} | {t['mi_peak']:.2f} / "
                  f"{c['mi_peak']:.2f} | {'yes' if suspect(r) else ''} |")
    out = ROOT / "benchmarks" / "results" / "misses_vs_gt.md"
    out.write_text("\n".join(md) + "\n")
    return out


def main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    from promptmid.evaluation.manifest import read_manifest
    from promptmid.evaluation.pipeline import select_pairs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "area_search_qc3")
    ap.add_argument("--run", default="unseen")
    ap.add_argument("--method", default="promptmid-lite+area-both-trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lo", type=float, default=5.0)
    ap.add_argument("--hi", type=float, default=12.0)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "optsar" / "all.jsonl")
    args = ap.parse_args()
    if not args.data.is_file():
        sys.exit(f"check_misses: no manifest at {args.data} (the shared optical-SAR pairs); nothing to check.")
    pairs = {p.id: p for p in select_pairs(read_manifest(args.data), qualities=["exact", "approx"])}
    misses = near_misses(args.results, args.run, args.method, args.lo, args.hi)
    with ProcessPoolExecutor(2) as pool:
        rows = list(pool.map(check, [pairs[i] for i, _ in misses], [args.method] * len(misses),
                             [args.seed] * len(misses)))
    print(write(rows, args).read_text())


if __name__ == "__main__":
    main()
