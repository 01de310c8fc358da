"""Time and peak memory of `promptmid scene` vs scene size (against the targets: a 1 MP scene <= 20 s and a
10k x 10k scene <= 3 min with `lite` on 2 cores, peak memory <= 2 GB), and of `promptmid batch` vs Dask workers.

Each run goes through a small wrapper process that reports the RUSAGE_CHILDREN peak of its own
descendants only, so every row's peak RSS is that run's largest single process (for batch: the
largest of the client and the Dask workers). Scenes are generated into benchmarks/cache/ (gitignored).
Writes benchmarks/results/scale.md (with the load average at the start: the machine may be shared).

    python benchmarks/bench_scale.py [--preset lite] [--threads 2] [--sizes 1000 10000] [--max-tiles N]
                                     [--workers 1 2]

--tile, --max-tiles and --settle default to `promptmid scene`'s defaults (SceneOptions).
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--threads", type=int, default=2)
    from promptmid.scene import SceneOptions

    ap.add_argument("--tile", type=int, default=SceneOptions.tile)
    ap.add_argument("--max-tiles", type=int, default=SceneOptions.max_tiles)
    ap.add_argument("--settle", type=int, default=SceneOptions.settle or 0,
                    help="stop once this many tiles agree (the scene default; 0 = match all --max-tiles tiles)")
    ap.add_argument("--search-radius", default=SceneOptions.search_radius,
                    help="the scene's default ('auto': 64 px at 10 m) covers the generated georeferencing error, a "
                         "0.5 degree rotation about the centre: up to 62 px at the corners of a 10k scene")
    ap.add_argument("--workers", type=int, nargs="*", default=[], help="batch rows (none by default)")
    a = ap.parse_args()
    a.load = os.getloadavg()
    rows, brows = [], []
    for size in a.sizes:
        d = ensure_pair(size)
        out = CACHE / f"out{size}"
        wall, peak, rc = run(BIN + ["scene", str(d / "optical.tif"), str(d / "sar.tif"), "--out", str(out),
                                    "--overwrite", "-p", a.preset, "--tile", str(a.tile), "--overlap", "128",
                                    "--max-tiles", str(a.max_tiles), "--settle", str(a.settle), "--search-radius", a.search_radius, "--threads",
                                    str(a.threads), "--quiet"])
        r = json.loads((out / "result.json").read_text())
        agreeing = len(r.get("agreement", {}).get("tiles_agreeing", []))
        rows.append((size, wall, peak, rc, f'{r["tiles"]["processed"]} ({agreeing})', r["tiles"]["grid"],
                     r["inliers"], r["rmse_before_px"], r["rmse_after_px"], r["timings"], r["status"],
                     truth_error(r, size)))
        print(rows[-1], flush=True)
    pairs = CACHE / "pairs.jsonl"
    ids = [ensure_pair(1000, s) for s in (1, 2)]
    pairs.write_text("\n".join(json.dumps({"id": p.name, "optical": f"{p.name}/optical.tif",
                                           "sar": f"{p.name}/sar.tif"}) for p in ids) + "\n")
    for w in a.workers:
        out = CACHE / f"batch_w{w}"
        subprocess.run(["rm", "-rf", str(out)])
        wall, peak, rc = run(BIN + ["batch", str(pairs), "--out", str(out), "-p", a.preset, "--workers", str(w),
                                    "--tile", "512", "--max-tiles", "4", "--search-radius", "200m", "--quiet"])
        brows.append((w, wall, peak, rc))
        print(brows[-1], flush=True)
    write_md(rows, brows, a)


def truth_error(result: dict, size: int) -> float | None:
    """Largest distance (px) over a 10 x 10 grid of the scene between the fitted global model and the truth (the
    generated pairs' optical px -> SAR px transform is the identity: only the SAR georeferencing is wrong)."""
    import numpy as np

    from promptmid.scene.model import GlobalModel

    if not result.get("global_model"):
        return None
    model = GlobalModel.from_dict(result["global_model"])
    grid = np.stack(np.meshgrid(np.linspace(0, size - 1, 10), np.linspace(0, size - 1, 10)), -1).reshape(-1, 2)
    return float(np.linalg.norm(model.apply(grid) - grid, axis=1).max())


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def write_md(rows: list, brows: list, a: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import header_lines

    md = header_lines("Scale benchmark", threads=a.threads) + [
          f"Preset {a.preset}, torch threads {a.threads} (`--threads`), tile {a.tile}, overlap 128, search radius "
          f"{a.search_radius}, at most {a.max_tiles} tiles matched spread-first, stopping once {a.settle or 'all'} agree "
          "(`--settle`), synthetic georeferenced UTM pairs at 10 m "
          "(benchmarks/cache/). Peak "
          "RSS = the run's largest process (MB); wall time includes starting Python and loading the models. Load "
          f"average when the run started: {a.load[0]:.1f} / {a.load[1]:.1f} / {a.load[2]:.1f} (1/5/15 min) on "
          f"{os.cpu_count()} logical CPUs (a shared machine: other jobs inflate the times).", "",
          "Targets: a 1 MP scene <= 20 s and a 10k x 10k scene <= 180 s with `lite` on 2 cores, peak memory "
          "<= 2048 MB.", "",
          f"## Scene size (`promptmid scene`, max {a.max_tiles} tiles, settle {a.settle or 'off'})", "",
          "| side px | wall s | target s | peak RSS MB | status | tiles processed (agreeing) / grid | inliers | "
          "RMSE before -> after px | max error vs truth px | split (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s, wall, peak, rc, n, g, inl, b, af, t, status, err in rows:
        split = ", ".join(f"{k} {v:.1f}" for k, v in t.items())
        target = {1000: 20.0, 10000: 180.0}.get(s)
        verdict = "" if target is None else (" (met)" if wall <= target and peak <= 2048 else " (MISSED)")
        md.append(f"| {s} | {wall:.1f} | {target or '-'}{verdict} | {peak:.0f} | {status} | {n} / {g} | {inl} | "
                  f"{_f(b)} -> {_f(af)} | {_f(err)} | {split} |")
    if not brows:
        md += ["", "(batch rows not run: `--workers 1 2` adds them)"]
    md += [] if not brows else ["", "## Dask workers (`promptmid batch`, 2 pairs of 1000 px, 4 tiles each, LocalCluster processes)", "",
           "| workers | wall s | peak RSS MB (largest process) | exit |", "|---|---|---|---|"]
    md += [f"| {w} | {wall:.1f} | {peak:.0f} | {rc} |" for w, wall, peak, rc in brows]
    out = ROOT / "benchmarks" / "results" / "scale.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
