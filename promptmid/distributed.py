"""Many scene pairs on Dask distributed (``promptmid batch PAIRS.jsonl --out DIR``).

``PAIRS.jsonl``: one JSON object per line, ``{"id": "...", "optical": "path", "sar": "path"}``
(paths relative to the JSONL file; ``id`` defaults to ``pair-<line number>``). Each pair is
registered by :func:`promptmid.scene.register_scene` into ``DIR/<id>/``; its ``result.json``
(written atomically) has ``status`` ``ok`` / ``uncertain`` (registered, QC verdict; see :mod:`promptmid.qc`) /
``failed`` / ``error`` (an exception; ``reason`` says which). Pairs whose ``result.json`` says ``ok``,
``uncertain`` or ``failed`` are
skipped on a rerun, so an interrupted batch resumes where it stopped; ``error`` pairs are retried.

Workers are processes with one thread each by default; each worker process builds one
:class:`promptmid.api.Matcher` per (preset, overrides) and reuses it (:func:`get_matcher`).
"""

from __future__ import annotations

import json
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from promptmid.errors import InputError

DONE_STATUSES = ("ok", "uncertain", "failed")
_MATCHERS: dict[str, Any] = {}
_LOADS = {"count": 0}


@dataclass
class Pair:
    """One line of PAIRS.jsonl with paths resolved."""

    id: str
    optical: str
    sar: str
    line: int
    error: str = ""


@dataclass
class BatchOptions:
    """What every pair is run with (see :class:`promptmid.scene.SceneOptions`)."""

    preset: str = "lite"
    overrides: dict[str, Any] = field(default_factory=dict)
    scene: dict[str, Any] = field(default_factory=dict)
    threads: int = 1  # torch threads per worker
    retry_failed: bool = False


def read_pairs(path: str | Path) -> list[Pair]:
    """Parse PAIRS.jsonl. Bad lines become pairs with ``error`` set (reported, not fatal).

    Raises:
        InputError: missing file, no pairs, or duplicate ids.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No pairs file at {path}.")
    pairs: list[Pair] = []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if text.strip() and not text.lstrip().startswith("#"):
            pairs.append(_parse_line(text, n, path.parent))
    if not pairs:
        raise InputError(f"{path} lists no pairs.")
    ids = [p.id for p in pairs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"{path}: duplicate pair ids {', '.join(dup)}.")
    return pairs


MAX_ID_LENGTH = 128  # pair ids become folder names


def _parse_line(text: str, n: int, root: Path) -> Pair:
    bad_id = f"~line-{n:04d}"  # for lines that are refused: '~' is not allowed in user ids, so never a collision
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict) or "optical" not in obj or "sar" not in obj:
            raise ValueError("needs an object with 'optical' and 'sar'")
    except ValueError as exc:
        return Pair(bad_id, "", "", n, f"line {n}: not a pair ({exc})")
    pid = str(obj.get("id", f"pair-{n:04d}"))
    if not re.fullmatch(r"[A-Za-z0-9._-]+", pid) or pid.startswith("."):
        return Pair(bad_id, "", "", n, f"line {n}: id {pid[:40]!r} must use letters, digits, '.', '_' or '-'")
    if len(pid) > MAX_ID_LENGTH:
        return Pair(bad_id, "", "", n, f"line {n}: id of {len(pid)} characters; at most {MAX_ID_LENGTH}")
    return Pair(pid, str(root / obj["optical"]), str(root / obj["sar"]), n)


def pair_status(out_root: Path, pair_id: str) -> str | None:
    """``status`` of ``out_root/pair_id/result.json``, or ``None`` when absent/unreadable."""
    try:
        return json.loads((out_root / pair_id / "result.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def get_matcher(preset: str, overrides: dict[str, Any]) -> Any:
    """This process's Matcher for ``(preset, overrides)``, built on first use (models load once per worker)."""
    from promptmid.api import Matcher

    key = json.dumps([preset, overrides], sort_keys=True)
    if key not in _MATCHERS:
        _MATCHERS[key] = Matcher(preset, overrides)
        _LOADS["count"] += 1
    return _MATCHERS[key]


def run_pair(pair: Pair, out_root: str, options: BatchOptions) -> dict[str, Any]:
    """Register one pair into ``out_root/<id>/`` (runs on a worker). Never raises.

    Returns:
        a summary row: id, status, reason, inliers, rmse_after_px, seconds, worker pid, matcher loads.
    """
    import torch

    from promptmid.outputs import prepare_out_dir, write_json
    from promptmid.scene import SceneOptions, register_scene

    t0 = time.perf_counter()
    torch.set_num_threads(options.threads)
    out = Path(out_root) / pair.id
    worker = {"pid": os.getpid(), "matcher_loads": _LOADS["count"]}
    try:
        if pair.error:
            raise InputError(pair.error)
        out = prepare_out_dir(out, overwrite=True)
        matcher = get_matcher(options.preset, options.overrides)
        worker["matcher_loads"] = _LOADS["count"]
        result = register_scene(pair.optical, pair.sar, out, matcher, SceneOptions(**options.scene)).to_dict()
    except Exception as exc:  # noqa: BLE001 - one broken pair must not stop the batch
        result = {"status": "error", "reason": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc(limit=5)}
    result.update(id=pair.id, optical=pair.optical, sar=pair.sar, worker=worker)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "result.json", result)
    return _row(result, time.perf_counter() - t0)


def _row(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    tiles = result.get("tiles") or {}
    return {"id": result["id"], "status": result["status"], "confidence": result.get("confidence"),
            "reason": result.get("reason", ""),
            "tiles": tiles.get("processed"), "inliers": result.get("inliers"),
            "rmse_after_px": result.get("rmse_after_px"), "seconds": round(seconds, 2),
            "worker_pid": result["worker"]["pid"], "matcher_loads": result["worker"]["matcher_loads"]}


def make_client(workers: int, threads_per_worker: int, scheduler: str | None) -> tuple[Any, Any]:
    """A Dask client on ``scheduler`` (``tcp://host:port``) or on a new LocalCluster of worker processes.

    Returns:
        ``(client, cluster or None)``; close both when done.
    """
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as exc:
            raise InputError(f"Cannot reach the Dask scheduler at {scheduler} ({exc}).") from None
    if workers < 1 or threads_per_worker < 1:
        raise InputError("--workers and --threads-per-worker must be at least 1.")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                           dashboard_address=None, silence_logs=40)
    return Client(cluster), cluster


def run_batch(pairs_file: str | Path, out_root: str | Path, options: BatchOptions, workers: int = 2,
              threads_per_worker: int = 1, scheduler: str | None = None,
              on_done: Callable[[dict[str, Any], int, int], None] | None = None) -> dict[str, Any]:
    """Run every unfinished pair of ``pairs_file`` on Dask; write ``out_root/summary.json`` atomically.

    Args:
        on_done: called with ``(row, done, total)`` after each pair (progress display).

    Returns:
        the summary: ``{"pairs": rows (in file order), "counts": {status: n}, "skipped": n, ...}``.
    """
    from dask.distributed import as_completed

    from promptmid.outputs import write_json

    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    pairs = read_pairs(pairs_file)
    skip = set(DONE_STATUSES) - ({"failed"} if options.retry_failed else set())
    todo = [p for p in pairs if pair_status(out_root, p.id) not in skip]
    rows = {p.id: _skipped_row(out_root, p.id) for p in pairs if p not in todo}
    t0 = time.perf_counter()
    if todo:
        client, cluster = make_client(workers, threads_per_worker, scheduler)
        try:
            futures = client.map(run_pair, todo, out_root=str(out_root.resolve()), options=options, pure=False,
                                 key=[f"pair-{p.id}-{time.time_ns()}" for p in todo])
            for n, fut in enumerate(as_completed(futures), 1):
                row = _collect(fut)
                rows[row["id"]] = row
                if on_done:
                    on_done(row, n, len(todo))
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    ordered = [rows[p.id] for p in pairs]
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("ok", "uncertain", "failed", "error", "skipped")}
    summary = {"pairs": ordered, "counts": counts, "ran": len(todo), "skipped": len(pairs) - len(todo),
               "seconds": round(time.perf_counter() - t0, 2), "workers": None if scheduler else workers,
               "scheduler": scheduler or "LocalCluster", "options": asdict(options)}
    write_json(out_root / "summary.json", summary)
    return summary


def _collect(fut: Any) -> dict[str, Any]:
    try:
        return fut.result()
    except Exception as exc:  # noqa: BLE001 - a worker died; run_pair itself never raises
        pid = str(fut.key).split("-", 1)[1].rsplit("-", 1)[0]
        return {"id": pid, "status": "error", "reason": f"worker lost: {type(exc).__name__}: {exc}",
                "seconds": None, "worker_pid": None, "matcher_loads": None}


def _skipped_row(out_root: Path, pair_id: str) -> dict[str, Any]:
    data = json.loads((out_root / pair_id / "result.json").read_text())
    return {**_row({**data, "worker": data.get("worker", {"pid": None, "matcher_loads": None})}, 0.0),
            "status": "skipped", "reason": f"already {data['status']}"}


def summary_rows(summary: dict[str, Any]) -> Iterable[list[str]]:
    """Rows for a printed table: id, status (with the QC confidence), tiles, inliers, RMSE after, seconds, reason."""
    for r in summary["pairs"]:
        rmse, conf = r.get("rmse_after_px"), r.get("confidence")
        status = f"{r['status']} ({conf:.2f})" if isinstance(conf, (int, float)) else r["status"]
        yield [r["id"], status, str(r.get("tiles") or ""), str(r.get("inliers") or ""),
               f"{rmse:.2f}" if isinstance(rmse, (int, float)) else "", str(r.get("seconds") or ""), r.get("reason", "")]
