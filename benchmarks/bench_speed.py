"""Time and peak memory per 512x512 optical/SAR pair, split by stage, for each preset.

Usage: .venv/bin/python benchmarks/bench_speed.py [--threads 1,2] [--repeats 5] [--cold-repeats 3]
           [--presets xfeat,aliked,lite-concat,lite,lite:nosearch]

``PRESET:nosearch`` runs the preset with the area-based search off (``--no-search``); ``PRESET:always`` runs the
search even when the keypoint fit is already ``ok`` (``--always-search``: the cost of a pair whose keypoints do not
settle it; by default an ``ok`` keypoint fit skips the search, and both searches run and are pooled);
``PRESET:gradients`` does that with the classical search only (``--search-features gradients``), ``:trained`` with
the trained-channel search only, ``:random`` with both searches and the fixed random projection (the previous
default, ``--search-features both``); ``PRESET:int8``
runs DINOv2 with int8 weights (``sources.dinov2.precision``; warm only, no CLI option).

Warm: each preset runs in its own subprocess (so peak RSS is per preset), on the generated demo
pair (no rotation search), after one warm-up call. Cold: the whole ``promptmid match`` command
(``python -m promptmid.cli``, this checkout) on the same pair written to files (optical PNG, SAR
GeoTIFF), in a fresh process each time: imports, model loading, matching and every product
(report.html, PNGs, GeoTIFF); converted-model caches already built by a first, untimed run.
Commands that match nothing (``--help``, ``models``, an input error) are timed the same way, fresh processes.
Prints tables and writes benchmarks/results/speed.md with machine, date and commit. Medians
over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_lines, markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "speed.md"
ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, statistics, sys, time
import torch
torch.set_num_threads({threads})
from promptmid.api import Matcher
from promptmid.synth import make_pair
pair = make_pair(512, seed=7)
m = Matcher("{preset}", {overrides})
m.match(pair.optical, pair.sar)  # warm-up: model loading, conversion cache
runs = []
for _ in range({repeats}):
    r = m.match(pair.optical, pair.sar)
    runs.append(r.timings)
keys = runs[0].keys()
med = {{k: statistics.median(t[k] for t in runs) for k in keys}}
med["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(med))
"""


# variant -> (overrides of the Matcher, the same as `promptmid match` options; None: no such option, warm rows only)
VARIANTS = {"nosearch": ({"search": {"enabled": False}}, ["--no-search"]),
            "always": ({"search": {"skip_when_ok": False}}, ["--always-search"]),
            "gradients": ({"search": {"skip_when_ok": False, "learned": None}},
                          ["--always-search", "--search-features", "gradients"]),
            "trained": ({"search": {"skip_when_ok": False, "learned": "trained"}},
                        ["--always-search", "--search-features", "trained"]),
            "random": ({"search": {"skip_when_ok": False, "learned": "both"}},
                       ["--always-search", "--search-features", "both"]),
            "int8": ({"sources": {"dinov2": {"precision": "int8"}}}, None)}


def run_preset(preset: str, threads: int, repeats: int) -> dict[str, float]:
    name, _, variant = preset.partition(":")
    overrides = VARIANTS[variant][0] if variant else {}
    code = CHILD.format(preset=name, threads=threads, repeats=repeats, overrides=repr(overrides))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_cli(preset: str, threads: int, repeats: int) -> dict[str, float]:
    """Median wall time (s), peak RSS (MB) and result.json stage timings of ``promptmid match`` in fresh processes."""
    from promptmid.demo import write_demo_inputs
    from promptmid.synth import make_pair

    name, _, variant = preset.partition(":")
    with tempfile.TemporaryDirectory() as tmp:
        pair = make_pair(512, seed=7)
        optical, sar = write_demo_inputs(Path(tmp) / "inputs", pair.optical, pair.sar)
        cmd = [sys.executable, "-m", "promptmid.cli", "match", str(optical), str(sar), "--out", f"{tmp}/out",
               "--overwrite", "--quiet", "--preset", name, "--threads", str(threads)]
        cmd += VARIANTS[variant][1] if variant else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        walls, rss, stages = [], [], []
        for i in range(repeats + 1):  # the first run builds any converted-model cache: not timed
            t0 = time.perf_counter()
            child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(child.pid, 0)
            wall = time.perf_counter() - t0
            child.returncode = os.waitstatus_to_exitcode(status)
            err = child.stderr.read().decode() if child.stderr else ""
            if child.returncode not in (0, 6):  # 6: --strict only; an uncertain verdict still exits 0
                raise RuntimeError(f"{' '.join(cmd)} exited {child.returncode}: {err[-2000:]}")
            if i:
                walls.append(wall)
                rss.append(usage.ru_maxrss / 1024)
                stages.append(json.loads((Path(tmp) / "out" / "result.json").read_text())["timings"])
    out = {k: statistics.median(t[k] for t in stages) for k in stages[0]}
    return {**out, "wall": statistics.median(walls), "peak_rss_mb": statistics.median(rss)}


# commands that match nothing: (label, arguments after `promptmid`, exit code expected)
QUICK_COMMANDS = [("promptmid --help", ["--help"], 0), ("promptmid match --help", ["match", "--help"], 0),
                  ("promptmid models --no-verify", ["models", "--no-verify"], 0),
                  ("promptmid models (sha256 of every file)", ["models"], 0),
                  ("promptmid match on a missing file", ["match", "missing_optical.tif", "missing_sar.tif", "--out",
                                                         "{tmp}/out"], 2)]


def run_quick(repeats: int) -> list[list[str]]:
    """Median wall time (s) of each of :data:`QUICK_COMMANDS` in fresh processes (one untimed run first)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, args, code in QUICK_COMMANDS:
            cmd = [sys.executable, "-m", "promptmid.cli", *(a.format(tmp=tmp) for a in args)]
            walls = []
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True)
                if done.returncode != code:
                    raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}, expected {code}")
                if i:
                    walls.append(time.perf_counter() - t0)
            rows.append([label, str(code), f"{statistics.median(walls):.2f}"])
            print("quick", label, rows[-1][-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", default="xfeat,aliked,lite-concat,lite,lite:nosearch,lite:always,lite:gradients,"
                        "lite:trained,lite:random,lite:int8")
    parser.add_argument("--cold-repeats", type=int, default=3, help="whole `promptmid match` runs per preset")
    parser.add_argument("--cold-presets", default="lite,lite:nosearch,lite:always")
    parser.add_argument("--quick-repeats", type=int, default=5, help="runs of each command that matches nothing")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    stages = ["read", "keypoints", "dinov2", "aggregation", "matching", "fitting", "search", "qc", "total"]
    rows = []
    threads = [int(t) for t in args.threads.split(",")]
    for n in threads:
        for preset in args.presets.split(","):
            t = run_preset(preset, n, args.repeats)
            rows.append([preset, str(n)] + [f"{t.get(s, 0.0):.3f}" for s in stages] + [f"{t['peak_rss_mb']:.0f}"])
            print(preset, n, json.dumps(t), flush=True)
    table = markdown_table(["preset", "threads"] + [f"{s} (s)" for s in stages] + ["peak RSS (MB)"], rows)
    cold_rows = []
    for n in threads:
        for preset in (args.cold_presets.split(",") if args.cold_repeats > 0 else []):
            t = run_cli(preset, n, args.cold_repeats)
            cold_rows.append([preset, str(n), f"{t['wall']:.2f}"] + [f"{t.get(s, 0.0):.3f}" for s in stages]
                             + [f"{t['wall'] - t['total']:.2f}", f"{t['peak_rss_mb']:.0f}"])
            print("cold", preset, n, json.dumps(t), flush=True)
    cold = markdown_table(["preset", "threads", "wall (s)"] + [f"{s} (s)" for s in stages]
                          + ["outside the pipeline (s)", "peak RSS (MB)"], cold_rows) if cold_rows else ""
    quick = markdown_table(["command", "exit code", "wall (s)"], run_quick(args.quick_repeats)) \
        if args.quick_repeats > 0 else ""
    load = (f"- load average (1 min) {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
            f"{os.cpu_count()} CPUs (other processes slow every stage alike)")
    text = "\n".join(header_lines("Speed per 512x512 pair", threads=max(threads))[:-1] + [load, ""] + [
        f"Generated demo pair (512x512, seed 7), no rotation search; median of {args.repeats} runs after a warm-up; "
        "stage times are summed over both images (keypoints, dinov2) and include guided re-matching (matching, "
        "fitting); search = the global area-based search (skipped when the keypoint fit is already ok, the default; "
        "`:always` runs it anyway: both searches, the default; `:gradients` the classical one only; `:trained` the "
        "trained-channel one only; `:random` both, with the random projection (the previous default); `:int8` DINOv2 "
        "with int8 weights, `sources.dinov2.precision`), "
        "qc = refinement and QC of every hypothesis. Target: the "
        "default (lite) <= 4 s per pair on 2 threads.", "", table, ""] + ([
        "## Whole command, cold", "",
        f"`promptmid match` on the same pair written to files (optical PNG, SAR float32 GeoTIFF), a fresh process "
        f"each time, median of {args.cold_repeats} runs: wall = the process from start to exit (imports, model "
        "loading, matching, every product: result.json, tiepoints.csv, registered_sar.tif, matches.png, "
        "checkerboard.png, report.html); stage columns are result.json's timings (first use of each model "
        "included); outside the pipeline = wall minus total (interpreter, imports, reading, products). Converted-"
        "model caches exist (built once by an untimed first run). Target: <= 5 s on 2 threads.", "", cold, ""]
        if cold else []) + ([
        "## Commands that match nothing", "",
        f"Fresh processes (`python -m promptmid.cli`, this checkout), median of {args.quick_repeats} after an untimed "
        "run; none of them imports torch. `models` verifies the sha256 of every weight file (about 220 MB read) "
        "unless `--no-verify`. Targets: `--help` <= 0.5 s; `models` and input errors well under a second.", "",
        quick, ""] if quick else []))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
