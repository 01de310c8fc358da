"""Time and peak memory per 512x512 optical/SAR pair, split by stage, for each preset.

Usage: .venv/bin/python benchmarks/bench_speed.py [--threads 1,2] [--repeats 5]
           [--presets xfeat,aliked,lite-concat,lite,lite:nosearch]

``PRESET:nosearch`` runs the preset with the area-based search off (``--no-search``).

Each preset runs in its own subprocess (so peak RSS is per preset), on the generated demo
pair (no rotation search), after one warm-up call. Prints a table and writes
benchmarks/results/speed.md with machine, date and commit. Medians over the repeats.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_lines, markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "speed.md"

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


def run_preset(preset: str, threads: int, repeats: int) -> dict[str, float]:
    name, _, variant = preset.partition(":")
    overrides = {"search": {"enabled": False}} if variant == "nosearch" else {}
    code = CHILD.format(preset=name, threads=threads, repeats=repeats, overrides=repr(overrides))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--presets", default="xfeat,aliked,lite-concat,lite,lite:nosearch")
    args = parser.parse_args()
    stages = ["read", "keypoints", "dinov2", "aggregation", "matching", "fitting", "search", "qc", "total"]
    rows = []
    threads = [int(t) for t in args.threads.split(",")]
    for n in threads:
        for preset in args.presets.split(","):
            t = run_preset(preset, n, args.repeats)
            rows.append([preset, str(n)] + [f"{t.get(s, 0.0):.3f}" for s in stages] + [f"{t['peak_rss_mb']:.0f}"])
            print(preset, n, json.dumps(t), flush=True)
    table = markdown_table(["preset", "threads"] + [f"{s} (s)" for s in stages] + ["peak RSS (MB)"], rows)
    text = "\n".join(header_lines("Speed per 512x512 pair", threads=max(threads)) + [
        f"Generated demo pair (512x512, seed 7), no rotation search; median of {args.repeats} runs after a warm-up; "
        "stage times are summed over both images (keypoints, dinov2) and include guided re-matching (matching, "
        "fitting); search = the global area-based search, qc = refinement and QC of every hypothesis. Target: the "
        "default (lite) <= 4 s per pair on 2 threads.", "", table, ""])
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
