"""Every registered method on every non-rough real pair of ../shared/data/optsar, grouped by the split.

Run:  .venv/bin/python benchmarks/bench_realpairs.py [--methods a,b] [--workers 1] [--threads 2] [--limit K]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=None, help="comma-separated (default: every default method)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--limit", type=int, default=None, help="first K pairs only (smoke runs)")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    manifest = args.data / "all.jsonl"
    if not manifest.is_file():
        print(f"bench_realpairs: no data at {manifest}; skipped.")
        return 0
    from promptmid.evaluation.manifest import read_manifest
    from promptmid.evaluation.methods import FULL_ROTATIONS, parse_methods
    from promptmid.evaluation.pipeline import run_and_report, select_pairs
    from promptmid.evaluation.runner import EvalConfig

    pairs = select_pairs(read_manifest(manifest), qualities=["exact", "approx"], limit=args.limit)
    conf = EvalConfig(parse_methods(args.methods), FULL_ROTATIONS, cache_dir=str(CACHE), threads=args.threads)
    done = [0]

    def progress(pair) -> None:
        done[0] += 1
        print(f"[{done[0]}/{len(pairs)}] {pair.id}", flush=True)

    out_dir = RESULTS / "realpairs"
    run_and_report(pairs, conf, out_dir, args.workers, title="Real optical-SAR pairs (non-rough GT)",
                   progress=progress)
    text = (out_dir / "summary.md").read_text()
    cmd = "`.venv/bin/python benchmarks/bench_realpairs.py" + (f" --methods {args.methods}" if args.methods else "") \
        + (f" --limit {args.limit}" if args.limit else "") + "`"
    (RESULTS / "realpairs.md").write_text(text.replace("\n", f"\n\nRegenerate: {cmd} (cached in benchmarks/cache/).\n", 1)
                                          + "\nPer-pair rows: benchmarks/results/realpairs/pairs.csv\n")
    print(f"wrote {RESULTS / 'realpairs.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
