"""Time and peak memory of `promptmid scene` vs scene size, and of `promptmid batch` vs Dask workers.

Each run goes through a small wrapper process that reports the RUSAGE_CHILDREN peak of its own
descendants only, so every row's peak RSS is that run's largest single process (for batch: the
largest of the client and the Dask workers). torch threads fixed to 1 per process. Scenes are
generated into benchmarks/cache/ (gitignored). Writes benchmarks/results/scale.md.

    python benchmarks/bench_scale.py [--sizes 1000 4000 10000] [--max-tiles 9]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache"
BIN = [sys.executable, "-m", "promptmid.cli"]


def ensure_pair(size: int, seed: int = 0) -> Path:
    from promptmid import synth

    d = CACHE / f"scene{size}_s{seed}"
    if not (d / "sar.tif").exists():
        t0 = time.perf_counter()
        synth.write_synthetic_geo_pair(d, size, seed=seed, rotation_deg=0.5, shift_m=(50, -30))
        print(f"generated {size} px in {time.perf_counter() - t0:.1f}s", flush=True)
    return d


# runs the command as its child and prints that child tree's peak RSS (KiB) on its last stderr line
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def run(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MB) of this run's largest process, exit code."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kib = float(proc.stderr.strip().splitlines()[-1])
    return wall, peak_kib / 1024, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000])
    ap.add_argument("--max-tiles", type=int, default=9)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    rows, brows = [], []
    for size in a.sizes:
        d = ensure_pair(size)
        out = CACHE / f"out{size}"
        wall, peak, rc = run(BIN + ["scene", str(d / "optical.tif"), str(d / "sar.tif"), "--out", str(out),
                                    "--overwrite", "-p", "xfeat", "--tile", "512", "--overlap", "64",
                                    "--max-tiles", str(a.max_tiles), "--search-radius", "200m", "--threads", "1",
                                    "--quiet"])
        r = json.loads((out / "result.json").read_text())
        rows.append((size, wall, peak, rc, r["tiles"]["processed"], r["tiles"]["grid"], r["inliers"],
                     r["rmse_before_px"], r["rmse_after_px"], r["timings"]))
        print(rows[-1], flush=True)
    pairs = CACHE / "pairs.jsonl"
    ids = [ensure_pair(1000, s) for s in (1, 2)]
    pairs.write_text("\n".join(json.dumps({"id": p.name, "optical": f"{p.name}/optical.tif",
                                           "sar": f"{p.name}/sar.tif"}) for p in ids) + "\n")
    for w in a.workers:
        out = CACHE / f"batch_w{w}"
        subprocess.run(["rm", "-rf", str(out)])
        wall, peak, rc = run(BIN + ["batch", str(pairs), "--out", str(out), "-p", "xfeat", "--workers", str(w),
                                    "--tile", "512", "--max-tiles", "4", "--search-radius", "200m", "--quiet"])
        brows.append((w, wall, peak, rc))
        print(brows[-1], flush=True)
    write_md(rows, brows, a)


def write_md(rows: list, brows: list, a: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import header_lines

    md = header_lines("Scale benchmark", threads=1) + [
          "Preset xfeat, torch threads 1 per process, tile 512, overlap 64, search radius 200 m, synthetic "
          "georeferenced UTM pairs (benchmarks/cache/). Peak RSS = the run's largest process (MB); wall time "
          "includes starting Python and loading the models.", "",
          f"## Scene size (`promptmid scene`, max {a.max_tiles} tiles)", "",
          "| side px | wall s | peak RSS MB | tiles processed / grid | inliers | RMSE before -> after px | split (s) |",
          "|---|---|---|---|---|---|---|"]
    for s, wall, peak, rc, n, g, inl, b, af, t in rows:
        split = ", ".join(f"{k} {v:.1f}" for k, v in t.items())
        md.append(f"| {s} | {wall:.1f} | {peak:.0f} | {n} / {g} | {inl} | {b:.2f} -> {af:.2f} | {split} |")
    md += ["", "## Dask workers (`promptmid batch`, 2 pairs of 1000 px, 4 tiles each, LocalCluster processes)", "",
           "| workers | wall s | peak RSS MB (largest process) | exit |", "|---|---|---|---|"]
    md += [f"| {w} | {wall:.1f} | {peak:.0f} | {rc} |" for w, wall, peak, rc in brows]
    out = ROOT / "benchmarks" / "results" / "scale.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
