"""How far the SAR may be rotated before the default stops registering, and what ``--try-rotations`` costs.

The displaced benchmarks (``bench_realpairs.py``) rotate the SAR by at most 15 degrees, the default area search's
range. This sweep rotates generated 512 px pairs (:func:`promptmid.synth.make_pair`, the demo's generator) about
their centre by larger angles, with a fixed small shift, and registers each with the default ``lite`` and with
``lite`` plus every rotation (the API equivalent of ``promptmid match --try-rotations``). Generated pairs only: a
rotation sweep of real pairs would cost ~40 s per pair and angle on 2 cores.

Run: ``.venv/bin/python benchmarks/bench_rotation.py --threads 2`` (writes ``benchmarks/results/rotation.md``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header_lines, markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rotation.md"
SIZE = 512
SUCCESS_PX = 5.0
SHIFT = (10.0, -6.0)  # px, applied after the rotation


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--angles", default="0,15,30,45,60,90,135,180")
    ap.add_argument("--seeds", default="3,7")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from promptmid.api import Matcher
    from promptmid.config import DEFAULT_ROTATION_STEP
    from promptmid.geometry import Size, affine_about_centre, corner_error
    from promptmid.io import rotation_steps
    from promptmid.synth import make_pair

    variants = {"default": Matcher("lite"),
                "--try-rotations": Matcher("lite", {"geometry": {"rotations": rotation_steps(DEFAULT_ROTATION_STEP)}})}
    angles = [float(a) for a in args.angles.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    warm = make_pair(SIZE, seed=0)
    variants["default"].match(warm.optical, warm.sar)  # warm-up: model loading
    rows = []
    for angle in angles:
        row = [f"{angle:g}"]
        for name, matcher in variants.items():
            right, ok, wrong_ok, times = 0, 0, 0, []
            for seed in seeds:
                # the SAR content turned clockwise as displayed by ``angle`` about the centre, then shifted
                truth = affine_about_centre(Size(SIZE, SIZE), -angle, 1.0, shift=SHIFT)
                pair = make_pair(SIZE, seed=seed, H=truth)
                t0 = time.perf_counter()
                result = matcher.match(pair.optical, pair.sar)
                times.append(time.perf_counter() - t0)
                err = (float(corner_error(result.transform, pair.H, Size(SIZE, SIZE)).mean())
                       if result.transform is not None else float("inf"))
                right += err <= SUCCESS_PX
                ok += result.status == "ok"
                wrong_ok += result.status == "ok" and err > SUCCESS_PX
                print(f"{angle:6g} deg seed {seed} {name:16s} error {err:8.2f} px {result.status:9s} "
                      f"{times[-1]:5.1f} s", flush=True)
            row += [f"{right}/{len(seeds)}", f"{ok} ({wrong_ok} wrong)", f"{statistics.median(times):.1f}"]
        rows.append(row)
    header = ["SAR rotation (deg)"] + [f"{n}: {c}" for n in variants for c in ("within 5 px", "ok", "median s")]
    text = "\n".join(header_lines("SAR rotation sweep (generated pairs)", args.threads) + [
        f"Generated {SIZE} px pairs (seeds {args.seeds}), SAR rotated about the centre and shifted {SHIFT} px; mean "
        "corner error against the known transform; `ok` = the QC verdict (wrong = ok but beyond 5 px). Default "
        "`lite`: keypoints at the SAR as given, then the area search over +-15 deg when the keypoints do not settle "
        "the pair. `--try-rotations`: keypoints at 0/90/180/270 deg and the area search over every rotation. "
        f"Load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (times are inflated by other "
        "jobs when it exceeds the thread count).", "",
        markdown_table(header, rows), ""])
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
