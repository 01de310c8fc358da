"""Shared pieces of the command-line interface: error handling, progress, common options.

Every user error prints one line on stderr and exits with a non-zero code
(see :mod:`promptmid.errors`); set ``PROMPTMID_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
import math
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console

from promptmid.config import DEFAULT_ROTATION_STEP, DEFAULTS, DIFFUSION_DEFAULTS, PROMPTDM, SEARCH_FEATURES
from promptmid.errors import InputError, PromptMIDError, UncertainResultError

err_console = Console(stderr=True)
out_console = Console()


def warn(message: str) -> None:
    """Print one warning line on stderr."""
    err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    """Print one error line on stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def verdict_markup(status: str, confidence: float) -> str:
    """A QC verdict for a rich table: ``ok`` green, ``uncertain`` yellow, else red, with its confidence."""
    colour = {"ok": "green", "uncertain": "yellow"}.get(status, "red")
    return f"[bold {colour}]{status}[/] (confidence {confidence:.2f})"


def uncertain(message: str, strict: bool) -> None:
    """An ``uncertain`` QC verdict: a warning on stderr (exit 0), or with ``--strict`` an error and exit 6."""
    if strict:
        fail(message, UncertainResultError.exit_code)
    warn(message)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn exceptions into one stderr line and an exit code (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("PROMPTMID_DEBUG"):
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except PromptMIDError as exc:
            fail(str(exc), exc.exit_code)
        except ValueError as exc:
            fail(str(exc), 2)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
            fail(f"unexpected {type(exc).__name__}: {exc} (set PROMPTMID_DEBUG=1 for the traceback)", 1)

    return wrapper


def add_command(app: typer.Typer, name: str, func: Callable[..., Any], help: str | None = None) -> None:
    """Register ``func`` as command ``name`` with the one error handling of the CLI (:func:`handle_errors`)."""
    app.command(name=name, help=help)(handle_errors(func))


@contextmanager
def status(quiet: bool) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr whose message the pipeline updates (silent when ``quiet``)."""
    if quiet:
        yield lambda _msg: None
        return
    with err_console.status("starting") as st:
        yield lambda msg: st.update(msg)


# numeric options: name -> (smallest valid value, whether it is excluded, largest valid value or None, message)
NUMERIC_LIMITS: dict[str, tuple[float, bool, float | None, str]] = {
    "threshold": (0.0, True, None, "the inlier threshold (SAR px) must be > 0"),
    "min_inliers": (3, False, None, "--min-inliers must be at least 3"),
    "top_k": (8, False, None, "--top-k must be at least 8 keypoints"),
    "max_side": (64, False, None, "--max-side must be at least 64 px"),
    "rotation_step": (0.0, True, 180.0, "--rotation-step must be in (0, 180] degrees"),
    "threads": (1, False, None, "--threads must be at least 1"),
    "search_rotation": (0.0, False, 180.0, "--search-rotation must be in [0, 180] degrees"),
}


def check_numeric(**opts: Any) -> None:
    """Refuse out-of-range numeric options up front (exit 2), before anything is read or written."""
    for name, value in opts.items():
        if value is None or name not in NUMERIC_LIMITS:
            continue
        low, exclusive, high, message = NUMERIC_LIMITS[name]
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{message}; got {value} (a finite number is needed).")
        if value < low or (exclusive and value == low) or (high is not None and value > high):
            raise InputError(f"{message}; got {value}.")


def build_overrides(**opts: Any) -> dict[str, Any]:
    """Map CLI options onto nested config overrides (``None`` = keep the preset's value).

    Raises:
        InputError: a numeric option out of range (:data:`NUMERIC_LIMITS`).
    """
    check_numeric(**opts)
    o: dict[str, Any] = {"io": {}, "keypoints": {}, "geometry": {}, "matching": {}}
    mapping = {
        "model": ("geometry", "model"), "threshold": ("geometry", "threshold"),
        "min_inliers": ("geometry", "min_inliers"), "top_k": ("keypoints", "top_k"),
        "detector": ("keypoints", "detector"), "max_side": ("io", "max_side"),
        "sar_scale": ("io", "sar_scale"), "ratio": ("matching", "ratio"),
        "optical_bands": ("io", "optical_bands"), "sar_bands": ("io", "sar_bands"),
    }
    for name, (section, key) in mapping.items():
        if opts.get(name) is not None:
            o[section][key] = opts[name]
    for key in ("optical_bands", "sar_bands"):  # checked up front, stored as a list of 1-based bands
        if opts.get(key) is not None:
            from promptmid.io import parse_bands

            bands = parse_bands(opts[key])
            o["io"][key] = list(bands) if bands else None
    if opts.get("nan_as_nodata"):
        o["io"]["nan_as_nodata"] = True
    if opts.get("try_rotations"):
        from promptmid.io import rotation_steps

        step = opts.get("rotation_step")
        o["geometry"]["rotations"] = rotation_steps(DEFAULT_ROTATION_STEP if step is None else step)
    o.update(search_overrides(opts))
    if any(opts.get(k) for k in ("dm", "dm_lora", "land_use", "dm_ensemble", "dm_timestep")):
        o["sources"] = {"diffusion": diffusion_conf(opts)}
    if opts.get("aggregator") == "none":
        from promptmid.config import CONCAT

        o["aggregator"] = CONCAT
    elif opts.get("aggregator"):
        o["aggregator"] = {"name": opts["aggregator"]}
    return o


def search_overrides(opts: dict[str, Any]) -> dict[str, Any]:
    """``{"search": ...}`` from ``--search/--no-search``, ``--always-search``, ``--search-rotation``,
    ``--search-scale LO,HI`` and ``--search-features`` (empty when none is given); a scale range that is not two
    positive numbers LO <= HI raises ``InputError``."""
    search: dict[str, Any] = {}
    if opts.get("search") is not None:
        search["enabled"] = bool(opts["search"])
    if opts.get("always_search"):
        search["skip_when_ok"] = False
    if opts.get("search_rotation") is not None:
        search["rotation_range"] = float(opts["search_rotation"])
    if opts.get("search_scale") is not None:
        try:
            lo, hi = (float(v) for v in str(opts["search_scale"]).split(","))
        except ValueError:
            raise InputError(f"--search-scale must be two numbers LO,HI (e.g. 0.8,1.25); got {opts['search_scale']!r}.")
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise InputError(f"--search-scale must be LO,HI with 0 < LO <= HI; got {opts['search_scale']!r}.")
        search["scale_range"] = (lo, hi)
    if opts.get("search_features") is not None:
        if opts["search_features"] not in SEARCH_FEATURE_CHOICES:
            raise InputError(f"--search-features must be one of {', '.join(SEARCH_FEATURE_CHOICES)}; "
                             f"got {opts['search_features']!r}.")
        search["learned"] = None if opts["search_features"] == "gradients" else opts["search_features"]
    return {"search": search} if search else {}


def diffusion_conf(opts: dict[str, Any]) -> dict[str, Any]:
    """Options of the diffusion source from ``--dm``, ``--dm-lora``, ``--land-use`` and friends.

    A Stable Diffusion model (anything but PromptDM-small) gets the source's own SD defaults (timestep, up-blocks,
    resolution, classifier settings) instead of the PromptDM-small settings of preset ``full``."""
    conf: dict[str, Any] = {"lora": opts.get("dm_lora"), "land_use": opts.get("land_use") or "auto"}
    if opts.get("dm"):
        conf["model"] = opts["dm"]
    if opts.get("dm") and not _is_promptdm(opts["dm"]):
        from promptmid.models.diffusion import DiffusionFeatures

        keys = ("timestep", "up_blocks", "ensemble", "long_side", "selection_long_side", "selection_noise")
        conf.update({k: DiffusionFeatures.default_conf[k] for k in keys})
    for key in ("ensemble", "timestep"):
        if opts.get(f"dm_{key}") is not None:
            conf[key] = opts[f"dm_{key}"]
    if opts.get("device"):
        conf["device"] = opts["device"]
    return conf


def resolve_preset(preset: str, dm: Optional[str], aggregator: Optional[str] = None) -> str:
    """``--dm`` needs a preset with the diffusion source: ``lite`` becomes ``full`` (ALIKED + DINOv2 + diffusion).

    Raises:
        InputError: ``--dm`` names a Stable Diffusion model while the preset's aggregator is a trained one and no
            ``--aggregator`` is given: the shipped aggregator of ``full`` was trained on PromptDM-small features
            and cannot read another model's features.
    """
    if dm and preset == "lite":
        err_console.print("note: --dm given: using preset 'full' (ALIKED + DINOv2 + diffusion features)")
        preset = "full"
    if dm and not aggregator and not _is_promptdm(dm):
        from promptmid.config import get_config

        trained = get_config(preset)["aggregator"].get("name", "concat")
        if trained != "concat":
            raise InputError(
                f"--dm {dm}: preset '{preset}' fuses with the aggregator {trained}, trained on PromptDM-small "
                "features; another diffusion model needs an aggregator trained with its features "
                "(--aggregator PATH, from `promptmid train --preset full` with that model) or the training-free "
                "fusion (--aggregator none).")
    return preset


def _is_promptdm(dm: str) -> bool:
    from promptmid.models.promptdm import is_promptdm

    return is_promptdm(dm)


def set_threads(threads: Optional[int]) -> None:
    """Torch CPU threads (``None`` = torch's default); refuses values below 1 (exit 2)."""
    check_numeric(threads=threads)
    if threads:
        import torch

        torch.set_num_threads(threads)


# Options shared by every command that builds descriptors.
PresetOpt = typer.Option("lite", "--preset", "-p", help="Pipeline preset: lite | xfeat | full.")
ModelOpt = typer.Option(None, "--geometry", "--model", "-m", help="Fitted transform family: affine (default) | "
                        "homography | similarity. (--model is a deprecated alias, to be removed in the next release.)")
ThresholdOpt = typer.Option(None, "--threshold",
                            help=f"Inlier threshold in SAR pixels (default {DEFAULTS['geometry']['threshold']:g}).")
RotOpt = typer.Option(False, "--try-rotations", help="Also try the SAR image rotated (steps of --rotation-step).")
RotStepOpt = typer.Option(None, "--rotation-step",
                          help=f"Rotation step in degrees for --try-rotations (default {DEFAULT_ROTATION_STEP:g}).")
SearchOpt = typer.Option(None, "--search/--no-search", help="Global area-based search for transform hypotheses "
                         "beside the keypoint fit; the QC evidence picks one (default: the preset's).")
AlwaysSearchOpt = typer.Option(False, "--always-search", help="Run the area search even when the keypoint fit is "
                               "already ok (by default it is skipped then: search.skip_when_ok).")
SearchRotOpt = typer.Option(None, "--search-rotation", help="Area search: rotations within +-DEG (default "
                            f"{DEFAULTS['search']['rotation_range']:g}; --try-rotations searches every rotation).")
SearchScaleOpt = typer.Option(None, "--search-scale", help="Area search: SAR scale range LO,HI relative to the "
                              "optical image (same footprint, or the pixel sizes of georeferenced images; default "
                              f"{','.join(f'{v:g}' for v in DEFAULTS['search']['scale_range'])}).")
SEARCH_FEATURE_CHOICES = ("gradients", *SEARCH_FEATURES)  # "gradients": none stacked (search.learned = None)
SearchFeaturesOpt = typer.Option(None, "--search-features", help="Area search channels: gradients (oriented "
                                 "gradients) | aliked (+ ALIKED's dense map, fixed random projection) | trained (+ "
                                 "ALIKED's map, trained projection) | both / both-trained (gradients and that "
                                 "search, hypotheses pooled; both-trained is the default: "
                                 "benchmarks/results/area_search_qc3.md). gradients is about twice as fast on "
                                 "pairs the keypoints do not settle; trained is in between (one validation pair "
                                 "more, one RADARSAT-2 pair fewer than the default).")
TopKOpt = typer.Option(None, "--top-k", help=f"Keypoints per image (default {DEFAULTS['keypoints']['top_k']}).")
MaxSideOpt = typer.Option(None, "--max-side",
                          help=f"Working resolution: long side in px (default {DEFAULTS['io']['max_side']}).")
MinInliersOpt = typer.Option(None, "--min-inliers",
                             help=f"Fewer inliers = failed (default {DEFAULTS['geometry']['min_inliers']}).")
ThreadsOpt = typer.Option(None, "--threads", help="CPU threads for torch (default: all).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress output.")
JsonOpt = typer.Option(False, "--json", help="Print result.json on stdout.")
AggregatorOpt = typer.Option(None, "--aggregator",
                             help="Descriptor fusion: 'none' = training-free concatenation, or a trained "
                                  "aggregator name (default: the preset's, concat for every preset).")
DmOpt = typer.Option(None, "--dm", help="Diffusion model instead of the shipped PromptDM-small of preset 'full': a "
                     "Stable Diffusion model (diffusers layout: local dir, or hub id with internet; needs --aggregator "
                     "PATH trained with its features, or --aggregator none) or a PromptDM-small file; implies 'full'.")
DmLoraOpt = typer.Option(None, "--dm-lora", help="PromptDM LoRA adapter (from `promptmid finetune-dm`).")
LandUseOpt = typer.Option(None, "--land-use", help="Land-use prompt: auto (diffusion classifier on the optical "
                          "image, default), average, or a class of the model (PromptDM-small: city, desert, frozen, "
                          "hills, mountain, plain, rural, water; Stable Diffusion: farmland, forest, grassland, water, "
                          "urban, rural settlement, road, bare land, mountain).")
DmEnsembleOpt = typer.Option(None, "--dm-ensemble", help="Noise draws averaged per image (default: PromptDM-small "
                             f"{PROMPTDM['ensemble']}, Stable Diffusion {DIFFUSION_DEFAULTS['ensemble']}).")
StrictOpt = typer.Option(False, "--strict", help="Exit 6 when the QC verdict is uncertain (default: exit 0 "
                          "with a warning on stderr).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace files in an existing output directory.")
# Input options shared by match, scene and batch (one definition: the same bands, scaling and nodata everywhere).
OpticalBandsOpt = typer.Option(None, "--optical-bands", help="Optical bands to use, 1-based as GDAL: 'R,G,B' (e.g. "
                               "'4,3,2') or one band. Default: by colour interpretation, band descriptions (B04,B03,"
                               "B02) or count (12-13 bands: Sentinel-2 order 4,3,2).")
SarBandsOpt = typer.Option(None, "--sar-bands", help="SAR bands to use, 1-based (several are averaged). Default: the "
                           "co-polarised band (VV/HH by description; band 1 of a 2-band dual-pol file).")
SarScaleOpt = typer.Option(None, "--sar-scale", help="SAR scaling: auto (uint8: linear; negative values: dB; else "
                           "log) | log | linear | db (already in dB: never logged twice).")
NanOpt = typer.Option(False, "--nan-as-nodata", help="Also mask NaN/inf pixels of the optical image (NaN/inf and the "
                      "nodata value of the SAR image are always masked).")
