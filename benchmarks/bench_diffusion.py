"""Benchmark the diffusion feature pass (VAE encode + one UNet pass per ensemble member + sampling).

Each configuration runs in its own subprocess so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; torch uses 2 threads.
Timings are the median of 3 runs after one warm-up run of ``DiffusionFeatures.describe``
with 2048 keypoints.

1. Tiny random SD model (tests/diffusion_fixtures.py): image size 256/512/768 at ensemble 4,
   and ensemble 1/2/4/8 at 512 px.
2. SD 2.1 compute estimate: a randomly initialised full-size SD 2.1 UNet (865 M params) and
   VAE built from their configs (weights do not change the cost), one VAE encode and one UNet
   pass (stopped after up-block 2, as DiffusionFeatures does) at 512 px, timed and
   FLOP-counted with ``torch.utils.flop_counter``.

Usage: ``python benchmarks/bench_diffusion.py [--skip-sd21] [--out benchmarks/results/diffusion.md]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
SIZES = (256, 512, 768)
ENSEMBLES = (1, 2, 4, 8)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child_tiny(model: str, size: int, ensemble: int) -> dict:
    """Time DiffusionFeatures.describe on one ``size`` x ``size`` image."""
    import torch

    from promptmid.models.diffusion import DiffusionFeatures

    torch.set_num_threads(THREADS)
    feats = DiffusionFeatures(model, land_use="urban", ensemble=ensemble, long_side=size)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    kps = torch.rand(2048, 2) * (size - 1)
    load_mb = _peak_mb()
    feats.describe(image, kps)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        feats.describe(image, kps)
        times.append(time.perf_counter() - t0)
    return {"size": size, "ensemble": ensemble, "median_s": statistics.median(times), "times": times,
            "peak_mb": _peak_mb(), "after_load_mb": load_mb}  # fmt: skip


def child_sd21(size: int = 512) -> dict:
    """Time and FLOP-count one SD 2.1-size VAE encode and one UNet pass (up to up-block 2)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "tests"))
    from diffusion_fixtures import sd21_unet_config, sd21_vae_config

    from promptmid.models.sd import SDComponents, unet_up_features

    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**sd21_unet_config()).eval().requires_grad_(False)
    vae = AutoencoderKL(**sd21_vae_config()).eval().requires_grad_(False)
    build_s = time.perf_counter() - t0
    comp = SDComponents(unet=unet, vae=vae, text_encoder=None, tokenizer=None, scheduler=None)
    image = torch.rand(1, 3, size, size) * 2 - 1
    latents = torch.randn(1, 4, size // 8, size // 8)
    text = torch.randn(1, 77, 1024)
    out: dict = {"size": size, "build_s": build_s, "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6}
    with torch.no_grad():
        for name, fn in (
            ("vae", lambda: vae.encode(image).latent_dist.mean),
            ("unet_up2", lambda: unet_up_features(comp, latents, 40, text, (1, 2))),
            ("unet_full", lambda: unet(latents, torch.tensor([40]), encoder_hidden_states=text)),
        ):
            counter = FlopCounterMode(display=False)
            t0 = time.perf_counter()
            with counter:
                fn()
            out[f"{name}_s"] = time.perf_counter() - t0
            out[f"{name}_gflop"] = counter.get_total_flops() / 1e9
    out["peak_mb"] = _peak_mb()
    return out


def run_child(args: list[str], timeout: float = 1800) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict[str, str]:
    """Machine, versions and load, for the report header."""
    import torch

    from promptmid.evaluation.pipeline import cpu_name, git_revision

    return {
        "cpu": cpu_name(),
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(THREADS),
        "date": dt.datetime.now().isoformat(timespec="minutes"),
        "commit": git_revision(ROOT),
        "load_avg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }


def write_report(path: Path, info: dict, tiny: list[dict], sd21: dict | None) -> None:
    lines = [
        "# Diffusion feature pass — time and memory",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, `torch.set_num_threads({info['threads']})`; "
        f"date {info['date']}; commit {info['commit']}; load average at start {info['load_avg']} "
        "(the machine is shared; timings under load are upper bounds).",
        "",
        "Generated by `python benchmarks/bench_diffusion.py`. Per image: resize, VAE encode, one batched UNet pass "
        "over the ensemble (stopped after up-block 2), sampling 2048 keypoints. Median of 3 runs after a warm-up; "
        "peak RSS of the whole process (Python + torch + model) via `ru_maxrss`.",
        "",
        "## Tiny random model (tests/diffusion_fixtures.py; UNet channels 32/32/64/64)",
        "",
        "| image (px) | ensemble | median time (s) | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['size']} | {r['ensemble']} | {r['median_s']:.3f} | {r['peak_mb']:.0f} |" for r in tiny]
    if sd21:
        lines += sd21_section(sd21)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def sd21_section(r: dict) -> list[str]:
    per_member = r["unet_up2_s"]
    est = {n: r["vae_s"] + n * per_member for n in (1, 4, 8)}
    gflop = {n: r["vae_gflop"] + n * r["unet_up2_gflop"] for n in (1, 4, 8)}
    return [
        "",
        f"## SD 2.1 estimate (random full-size UNet, {r['unet_params_m']:.0f} M params, and VAE, built from configs)",
        "",
        f"Measured at {r['size']} px, batch 1 (one ensemble member), fp32, {THREADS} threads:",
        "",
        "| part | GFLOP | time (s) |",
        "|---|---|---|",
        f"| VAE encode | {r['vae_gflop']:.0f} | {r['vae_s']:.1f} |",
        f"| UNet to up-block 2 (what DiffusionFeatures runs) | {r['unet_up2_gflop']:.0f} | {r['unet_up2_s']:.1f} |",
        f"| full UNet (for reference) | {r['unet_full_gflop']:.0f} | {r['unet_full_s']:.1f} |",
        "",
        f"Peak RSS {r['peak_mb']:.0f} MB (fp32 weights: UNet ~3.5 GB). Per image at 512 px: time ≈ VAE + ensemble × UNet "
        "(assumes UNet cost linear in the batch, as for a compute-bound model; not verified at full size); FLOPs scale with pixel count "
        "(plus the quadratic self-attention term at 1/8 and 1/16 resolution).",
        "",
        "| ensemble | GFLOP | est. time on this CPU (s) |",
        "|---|---|---|",
        *[f"| {n} | {gflop[n]:.0f} | {est[n]:.0f} |" for n in (1, 4, 8)],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs="*")
    parser.add_argument("--skip-sd21", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diffusion.md"))
    args = parser.parse_args()
    if args.child is not None:
        kind, *rest = args.child
        result = child_sd21() if kind == "sd21" else child_tiny(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    info = machine()
    sys.path.insert(0, str(ROOT / "tests"))
    from diffusion_fixtures import make_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_sd(Path(tmp) / "tiny_sd"))
        configs = [(s, 4) for s in SIZES] + [(512, e) for e in ENSEMBLES if e != 4]
        tiny = []
        for size, ens in configs:
            tiny.append(run_child(["tiny", model, str(size), str(ens)]))
            print(json.dumps(tiny[-1]), flush=True)
    tiny.sort(key=lambda r: (r["ensemble"] != 4, r["size"], r["ensemble"]))
    sd21 = None if args.skip_sd21 else run_child(["sd21"])
    if sd21:
        print(json.dumps(sd21), flush=True)
    write_report(Path(args.out), info, tiny, sd21)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
