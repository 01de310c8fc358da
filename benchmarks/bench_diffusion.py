"""PromptDM-small diffusion features: selection on perturbed validation, zero-shot land use, speed, and the preset table.

Parts (``--parts``, comma-separated; each writes its own section of ``benchmarks/results/diffusion.md``):

- ``select``: DIFT features of PromptDM-small alone (one timestep, ensemble, up-block output sampled at ALIKED
  keypoints, L2-normalised, mutual nearest neighbours) on the **validation** pairs only (srif 181-200, every SAR
  displaced as ``promptmid eval --perturb 0``; the SAR rotated by the 90-degree step nearest to the truth, as the
  rotation search would). Reported per (timestep, up-block): mean number of correct matches (<= 3 px, NCM) and
  their share of the matches (precision). The preset uses the best (timestep, block) by precision.
- ``landuse``: the zero-shot diffusion classifier (``--land-use auto``) on the optical images of the 3MOS tiles of
  the **unseen** sensors (Sentinel-1, RADARSAT-2, ALOS, TerraSAR-X) against their ``scene`` label; chance = 1/8.
- ``speed``: time of the diffusion source on one 512x512 image (classifier + features), 1 thread.

The preset comparison (full vs lite vs peers, ablations) runs through ``benchmarks/bench_realpairs.py`` with
``--methods`` and ``--out benchmarks/results/diffusion_realpairs.md``; this script only runs the parts above.

Usage: ``python benchmarks/bench_diffusion.py --parts select,landuse,speed [--threads 1] [--limit K]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import header_lines, markdown_table  # noqa: E402

from promptmid.geometry import apply_transform  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "optsar"
RESULTS = ROOT / "benchmarks" / "results"
TIMESTEPS = [50, 200]  # candidates of the selection (--timesteps)
BLOCKS = [0, 1]  # candidate up-blocks (--blocks; 2 = full resolution, 64 ch, the costliest)
THRESHOLD_PX = 3.0
CONCAT_WEIGHT = 0.7  # weight of the diffusion part in the ALIKED + diffusion concatenation (config.CONCAT "sd")
PER_FIGURE = [0]  # --per-figure
MODEL: dict[str, str] = {}  # {"model": path} from --model (a training checkpoint instead of the shipped weights)


def diffusion_conf(**over: Any) -> dict[str, Any]:
    """The diffusion-source settings of preset ``full`` with ``over`` applied."""
    from promptmid.config import get_config

    conf = dict(get_config("full")["sources"]["diffusion"])
    conf.update(MODEL)
    conf.update(over)
    return conf


def _source(**over: Any):
    from promptmid.models.diffusion import DiffusionFeatures

    return DiffusionFeatures(**diffusion_conf(**over))


def _val_pairs(limit: int | None) -> list:
    from promptmid.evaluation.manifest import read_manifest
    from promptmid.evaluation.pipeline import select_pairs
    from promptmid.evaluation.split import split_group

    pairs = [p for p in select_pairs(read_manifest(DATA / "all.jsonl"), qualities=["exact", "approx"])
             if split_group(p) == "val"]
    return pairs[:limit] if limit else pairs


def _prepared_val_pair(rec) -> tuple[Any, Any, np.ndarray]:
    """Optical, SAR (displaced by Perturbation(0), rotated by the right 90-degree step) and the GT mapping
    optical working px -> rotated-SAR working px."""
    from promptmid.io import rotate_prepared
    from promptmid.config import get_config
    from promptmid.evaluation.perturb import Perturbation, warp_raster
    from promptmid.io import load_image, read_raster
    from promptmid.training.data import best_rotation_step, working_gt

    io = get_config("lite")["io"]
    raster = read_raster(rec.sar)
    T, canvas = Perturbation(0).draw(rec.id, raster.size)
    raster, H = warp_raster(raster, T, canvas), T @ rec.H
    opt, sar = load_image(rec.optical, "optical", **io), load_image(raster, "sar", **io)
    Hw = working_gt(H, opt, sar)
    rotated, to_sar = rotate_prepared(sar, best_rotation_step(sar, Hw))
    return opt, rotated, np.linalg.inv(to_sar) @ Hw


def part_select(threads: int, limit: int | None) -> str:
    """Per (timestep, up-block): NCM and precision of diffusion-only MNN matches on perturbed validation."""
    import torch

    from promptmid.io import image_tensor
    from promptmid.geometry import Size
    from promptmid.matching import mutual_nearest_neighbours
    from promptmid.models.base import PairContext
    from promptmid.models.keypoints import KeypointExtractor
    from promptmid.models.sampling import sample_features

    pairs = _val_pairs(limit)
    extractor = KeypointExtractor(detector="aliked", top_k=2048)
    sources = {t: _source(timestep=t, up_blocks=BLOCKS) for t in TIMESTEPS}
    stats: dict[Any, list[tuple[int, int, int, int]]] = {}
    normalize = torch.nn.functional.normalize
    for k, rec in enumerate(pairs):
        opt, sar, H = _prepared_val_pair(rec)
        imgs = [image_tensor(opt.image), image_tensor(sar.image)]
        local = [extractor(im, p.valid) for im, p in zip(imgs, (opt, sar))]
        kps = [x["keypoints"] for x in local]
        aliked = [normalize(x["descriptors"].float(), dim=1) for x in local]
        stats.setdefault("aliked", []).append(_score(mutual_nearest_neighbours(*aliked)[0], kps, H))
        for t, src in sources.items():
            ctx = PairContext()
            src.begin_pair(imgs[0], ctx)
            maps = [src.dense(im, modality=m, context=ctx) for im, m in zip(imgs, ("optical", "sar"))]
            for b in BLOCKS:
                d = [normalize(sample_features(mp[f"sd_up{b}"], kp.float(), Size.of(im)), dim=1)
                     for mp, kp, im in zip(maps, kps, imgs)]
                stats.setdefault((t, b), []).append(_score(mutual_nearest_neighbours(*d)[0], kps, H))
                fused = [torch.cat([a, CONCAT_WEIGHT * x], 1) for a, x in zip(aliked, d)]
                stats.setdefault((t, b, "+"), []).append(_score(mutual_nearest_neighbours(*fused)[0], kps, H))
        print(f"[select {k + 1}/{len(pairs)}] {rec.id}", flush=True)
    rows, best = [], None
    for key, vals in stats.items():
        v = np.asarray(vals, dtype=float)
        ncm3, ncm10, prec = v[:, 0].mean(), v[:, 1].mean(), v[:, 0].sum() / max(1.0, v[:, 3].sum())
        if key == "aliked":
            name = ["-", "ALIKED descriptor alone (reference)"]
        else:
            chan, stride = sources[key[0]].channels()[f"sd_up{key[1]}"], sources[key[0]].strides()[f"sd_up{key[1]}"]
            what = f"up-block {key[1]} ({chan} ch, stride {stride} px)"
            name = [str(key[0]), ("ALIKED + " + what) if len(key) == 3 else what + " alone"]
            if len(key) == 3:
                best = max(best or ((ncm3, ncm10), key), ((ncm3, ncm10), key))
        rows.append(name + [f"{ncm3:.1f}", f"{ncm10:.1f}", f"{prec:.3f}"])
    conf = diffusion_conf()
    return "\n".join([
        "## Timestep and up-block, chosen on perturbed validation", "",
        f"{len(pairs)} validation pairs (srif 181-200), every SAR displaced as `promptmid eval --perturb 0` and "
        f"rotated by the 90-degree step nearest to the truth; ALIKED keypoints (top-k 2048); PromptDM-small "
        f"features (ensemble {conf['ensemble']}, long side {conf['long_side']} px, land use auto) alone and "
        f"concatenated with the ALIKED descriptor (weight {CONCAT_WEIGHT}), mutual nearest neighbours, no fit; "
        f"NCM = matches within 3 / 10 px of the truth; {threads} torch thread(s).", "",
        markdown_table(["timestep", "descriptor", "mean NCM@3", "mean NCM@10", "precision@3"], rows), "",
        f"Chosen (most correct matches within 3 px when added to ALIKED, ties broken by NCM@10): timestep "
        f"{best[1][0]}, up-block {best[1][1]} (mean NCM@3 {best[0][0]:.1f}, NCM@10 {best[0][1]:.1f}).", ""])


def _score(matches: np.ndarray, kps: list, H: np.ndarray) -> tuple[int, int, int, int]:
    """(correct within 3 px, within 10 px, unused, number of matches) of MNN ``matches`` under ``H``."""
    err = np.linalg.norm(apply_transform(H, kps[0][matches[:, 0]].numpy()) - kps[1][matches[:, 1]].numpy(), axis=1)
    return int((err <= THRESHOLD_PX).sum()), int((err <= 10.0).sum()), 0, len(matches)


def _unseen_3mos(limit: int | None) -> list:
    from promptmid.evaluation.manifest import read_manifest
    from promptmid.evaluation.split import split_group

    pairs = [p for p in read_manifest(DATA / "manifests" / "3mos.jsonl")
             if split_group(p).startswith("unseen:3mos")]
    if PER_FIGURE[0]:  # tile ids end in _<k>: keep k < per-figure of every (sensor, scene) figure
        pairs = [p for p in pairs if int(p.id.rsplit("_", 1)[-1]) < PER_FIGURE[0]]
    return pairs[:limit] if limit else pairs


def part_landuse(threads: int, limit: int | None) -> str:
    """Zero-shot land-use accuracy on unseen 3MOS optical tiles vs chance 1/8 (what ``--land-use auto`` classifies)."""
    from promptmid.io import image_tensor
    from promptmid.io import load_image
    from promptmid.models.promptdm import LAND_USE_3MOS

    src = _source()
    pairs = _unseen_3mos(limit)
    hits: dict[str, list[int]] = {}
    confusion: dict[tuple[str, str], int] = {}
    for k, rec in enumerate(pairs):
        truth = str(rec.meta["scene"])
        for modality, path in (("optical", rec.optical),):
            image = image_tensor(load_image(path, modality).image)
            guess, _ = src.choose_land_use(image, modality)
            hits.setdefault(modality, []).append(int(guess == truth))
            hits.setdefault(f"{modality}:{rec.group}", []).append(int(guess == truth))
            if modality == "optical":
                confusion[(truth, guess)] = confusion.get((truth, guess), 0) + 1
        if (k + 1) % 10 == 0:
            print(f"[landuse {k + 1}/{len(pairs)}]", flush=True)
    rows = [[key, str(len(v)), f"{np.mean(v):.3f}"] for key, v in sorted(hits.items())]
    truths = sorted({t for t, _ in confusion})
    conf_rows = [[t] + [str(confusion.get((t, g), 0)) for g in LAND_USE_3MOS] for t in truths]
    c = src.conf
    return "\n".join([
        "## Zero-shot land use (`--land-use auto`) on the unseen 3MOS tiles", "",
        f"{len(pairs)} tiles of the unseen sensors (never used for training or selection); truth = the manifest "
        f"`scene`; 8 classes, **chance 0.125**. Classifier: lowest denoising error over timesteps "
        f"{tuple(c['selection_timesteps'])}, {c['selection_noise']} noise draw(s) each, image resized to "
        f"{c['selection_long_side']} px; {threads} torch thread(s).", "",
        markdown_table(["images", "n", "accuracy"], rows), "",
        "Optical confusion (rows: truth, columns: chosen):", "",
        markdown_table(["truth"] + list(LAND_USE_3MOS), conf_rows), ""])


def part_speed(threads: int, limit: int | None) -> str:
    """Seconds for the land-use choice and for the features of one 512x512 image."""
    import torch

    from promptmid.models.base import PairContext

    src = _source()
    image = torch.rand(1, 3, 512, 512)
    kps = torch.rand(2048, 2) * 511
    src.describe(image, kps, modality="optical", context=PairContext(land_use=src.prompts.classes[0]))  # warm-up
    t0 = time.perf_counter()
    src.choose_land_use(image)
    t1 = time.perf_counter()
    for _ in range(3):
        src.describe(image, kps, modality="optical", context=PairContext(land_use=src.prompts.classes[0]))
    t2 = time.perf_counter()
    c = src.conf
    return "\n".join([
        "## Speed of the PromptDM-small source", "",
        markdown_table(["step (512x512 image, 2048 keypoints)", "seconds"], [
            ["land-use choice (once per pair, optical image)", f"{t1 - t0:.2f}"],
            [f"features (ensemble {c['ensemble']}, long side {c['long_side']} px, up-blocks {c['up_blocks']})",
             f"{(t2 - t1) / 3:.2f}"]]),
        "", f"{threads} torch thread(s); a `full` pair adds the land-use choice once and the features twice to "
        f"`lite`'s cost.", ""])


def part_presets(threads: int, limit: int | None) -> str:
    """`full` vs `lite` vs peers and the ablations, from the headline.json files bench_realpairs.py wrote
    (``diffusion_realpairs`` and, when present, ``diffusion_ablations``); runs nothing itself."""
    import json

    runs: dict[str, dict] = {}
    for name in ("diffusion_realpairs", "diffusion_ablations"):
        path = RESULTS / name / "headline.json"
        if path.is_file():
            for run, methods in json.loads(path.read_text()).items():
                label = run if name == "diffusion_realpairs" else f"{run}: 17 srif pairs (prompt ablations)"
                runs.setdefault(label, {}).update(methods)
    rows = []
    for run, methods in runs.items():
        for method, models in methods.items():
            m = models.get("affine+refine", {})
            rows.append([run, method, str(m.get("pairs", "-")), f"{m.get('sr@5', float('nan')):.2f}",
                         f"{m.get('auc@5', float('nan')):.2f}", f"{m.get('mean_ncm_before', float('nan')):.1f}",
                         f"{m.get('median_time_features', float('nan')):.1f}"])
    return "\n".join([
        "## `full` against `lite` and the peers (perturbed protocol)", "",
        "`promptmid eval --perturb 0` protocol through `benchmarks/bench_realpairs.py` (affine fit + area-based "
        "refinement for every method; `val` = srif 181-200 + lnift_matlab + rift2 with rotation search, `unseen` = "
        "2 tiles per unseen 3MOS figure + msg, vsff, mapglue, rift, osmnet), 1 worker, 1 torch thread, on a shared "
        "2-core machine (load average 5-10: times are upper bounds). Regenerate: `bench_realpairs.py --methods "
        "promptmid-full,promptmid-lite,xfeat-mnn,aliked-mnn,aliked-lightglue,rift --runs val,unseen --per-figure 2 "
        "--workers 1 --threads 1 --out benchmarks/results/diffusion_realpairs.md`, then `bench_diffusion.py --parts "
        "presets`. Prompt ablations: `--methods promptmid-full,promptmid-lite,promptmid-full-noprompt,"
        "promptmid-full-wrongprompt --runs val --limit 17 --out benchmarks/results/diffusion_ablations.md` (empty "
        "prompt; the prompt 'a photograph of a cat on a sofa' instead of the land-use prompt).", "",
        markdown_table(["run", "method", "pairs", "SR@5", "AUC@5", "mean NCM (3 px, before fit)",
                        "median feature time per pair (s)"], rows), ""])


PARTS = {"presets": part_presets, "select": part_select, "landuse": part_landuse, "speed": part_speed}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="select,landuse,speed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None, help="first K pairs/tiles only (smoke runs)")
    ap.add_argument("--out", type=Path, default=RESULTS / "diffusion.md")
    ap.add_argument("--model", default=None, help="PromptDM-small weights file (default: the shipped ones)")
    ap.add_argument("--timesteps", default=",".join(map(str, TIMESTEPS)), help="selection candidates")
    ap.add_argument("--blocks", default=",".join(map(str, BLOCKS)), help="selection candidates (up-blocks)")
    ap.add_argument("--per-figure", type=int, default=0, help="landuse: first K tiles per 3MOS figure (0 = all)")
    args = ap.parse_args()
    TIMESTEPS[:] = [int(t) for t in args.timesteps.split(",")]
    BLOCKS[:] = [int(b) for b in args.blocks.split(",")]
    PER_FIGURE[0] = args.per_figure
    if args.model:
        MODEL["model"] = args.model
    if not (DATA / "all.jsonl").is_file():
        print(f"bench_diffusion: no data at {DATA}; skipped.")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    sections_dir = args.out.parent / (args.out.stem + "_parts")
    sections_dir.mkdir(parents=True, exist_ok=True)
    for name in [p.strip() for p in args.parts.split(",") if p.strip()]:
        text = PARTS[name](args.threads, args.limit)
        print(text)
        (sections_dir / f"{name}.md").write_text(text, encoding="utf-8")
    # summary.md: the conclusions, written by hand from the parts;
    # sd21.md: the earlier Stable Diffusion 2.1 cost estimate
    order = ["summary", *PARTS, "sd21"]
    body = [(sections_dir / f"{n}.md").read_text(encoding="utf-8") for n in order if (sections_dir / f"{n}.md").is_file()]
    args.out.write_text("\n".join(header_lines("PromptDM-small diffusion features", args.threads) + body),
                        encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
