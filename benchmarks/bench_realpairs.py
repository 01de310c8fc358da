"""Every registered method on the real pairs of ../shared/data/optsar, grouped by the split.

Run:  .venv/bin/python benchmarks/bench_realpairs.py [--methods a,b] [--workers 1] [--threads 2]
          [--per-figure 2] [--all] [--limit K]

Default protocol (what benchmarks/results/realpairs.md reports), exact/approx GT only:
1. the validation pairs (srif 181-200) and the rotated near-domain sources (lnift_matlab, rift2) with SAR
   rotation search 0/90/180/270 deg for every method that is not rotation-invariant (these pairs are
   rotated by up to 90 deg);
2. the unseen test domains (3MOS Sentinel-1, RADARSAT-2, ALOS, TerraSAR-X; msg, vsff, mapglue, rift)
   plus the near-domain osmnet, all aligned, without rotation search (``--per-figure K`` keeps the
   first K tiles of each 3MOS figure; 0 = all).
The training sources are left out (they are what the aggregator was fitted to); ``--all`` runs every
non-rough pair, training sources included, with rotation search (hours on a laptop CPU).

Writes benchmarks/results/realpairs.md (plus pairs.csv / summary.json / figures under
benchmarks/results/realpairs/). Raw matches are cached per (method, pair) in benchmarks/cache/
(gitignored), so an interrupted run resumes where it stopped. Methods that are not
rotation-invariant search SAR rotations 0/90/180/270 deg (srif pairs are rotated up to 90 deg).
torch threads are fixed (default 2 per worker process) so that timings are comparable.
Skips cleanly (exit 0) when the data folder is absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "optsar"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / "cache"


def unseen_subset(pairs: list, per_figure: int) -> list:
    """The unseen test pairs of :func:`promptmid.training.data.test_subset` (the first ``per_figure`` tiles of
    each unseen 3MOS figure, 0 = all, and every pair of the other unseen sources) plus the near-domain osmnet."""
    from promptmid.training.data import test_subset

    return test_subset(pairs, per_figure or 10**6) + [p for p in pairs if p.source == "osmnet"]


def progress_printer(total: int):
    done = [0]

    def progress(pair) -> None:
        done[0] += 1
        print(f"[{done[0]}/{total}] {pair.id}", flush=True)

    return progress


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=None, help="comma-separated (default: every default method)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--limit", type=int, default=None, help="first K pairs only (smoke runs)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--per-figure", type=int, default=0, help="unseen 3MOS tiles per figure (0 = all)")
    ap.add_argument("--all", action="store_true", help="every non-rough pair, rotation search everywhere")
    args = ap.parse_args()
    manifest = args.data / "all.jsonl"
    if not manifest.is_file():
        print(f"bench_realpairs: no data at {manifest}; skipped.")
        return 0
    from promptmid.evaluation.manifest import read_manifest
    from promptmid.evaluation.methods import FULL_ROTATIONS, parse_methods
    from promptmid.evaluation.pipeline import run_and_report, select_pairs
    from promptmid.evaluation.runner import EvalConfig
    from promptmid.evaluation.split import split_group

    pairs = select_pairs(read_manifest(manifest), qualities=["exact", "approx"])
    runs = ({"all": (pairs, FULL_ROTATIONS)} if args.all else
            {"validation and rotated near-domain (rotation search)":
                ([p for p in pairs if split_group(p) == "val" or p.source in ("lnift_matlab", "rift2")],
                 FULL_ROTATIONS),
             "unseen and near-domain, aligned (no rotation search)": (unseen_subset(pairs, args.per_figure), [0.0])})
    texts = []
    for i, (name, (subset, rotations)) in enumerate(runs.items()):
        subset = subset[: args.limit] if args.limit else subset
        conf = EvalConfig(parse_methods(args.methods), rotations, cache_dir=str(CACHE), threads=args.threads)
        out_dir = RESULTS / "realpairs" / f"run{i}"
        run_and_report(subset, conf, out_dir, args.workers, title=f"Real optical-SAR pairs: {name}",
                       progress=progress_printer(len(subset)))
        texts.append((out_dir / "summary.md").read_text())
    cmd = "`.venv/bin/python benchmarks/bench_realpairs.py" + (f" --methods {args.methods}" if args.methods else "") \
        + (" --all" if args.all else f" --per-figure {args.per_figure}") + (f" --limit {args.limit}" if args.limit else "") + "`"
    (RESULTS / "realpairs.md").write_text(f"Regenerate: {cmd} (raw matches cached in benchmarks/cache/).\n\n"
                                          + "\n\n".join(texts)
                                          + "\nPer-pair rows: benchmarks/results/realpairs/run*/pairs.csv\n")
    print(f"wrote {RESULTS / 'realpairs.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
