"""Pair manifests (README, 'Manifest format'): JSON lines, one optical/SAR pair with ground truth per line.

Each line: ``{"id", "optical", "sar", "H"?, "points"?, "source"?, ...}``. Paths are relative to the
manifest file. ``H`` (3x3) maps an optical pixel (x = column, y = row, pixel centres at integers,
origin top-left) to the SAR pixel; ``points`` are check points ``[xo, yo, xs, ys]`` in the same
convention. Either ``H`` or ``points`` must be present. Any bad line raises :class:`InputError`
naming the file and the 1-based line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from promptmid.errors import InputError


@dataclass
class Pair:
    """One evaluation pair.

    Attributes:
        id: unique pair name, e.g. ``"srif/pair1"``.
        optical, sar: absolute image paths.
        source: dataset name (``"srif"``); ``"unknown"`` when the line has none.
        H: ``[3, 3]`` optical -> SAR pixel transform, or ``None`` (then ``points`` are given).
        points: ``[P, 4]`` check points ``(xo, yo, xs, ys)`` or ``None``.
        meta: every other key of the line (``gt_quality``, ``sensor``, ...).
        where: ``"file:line"`` of the manifest line, for messages.
    """

    id: str
    optical: Path
    sar: Path
    source: str = "unknown"
    H: np.ndarray | None = None
    points: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    where: str = ""

    @property
    def gt_quality(self) -> str:
        return str(self.meta.get("gt_quality", "unknown"))

    @property
    def group(self) -> str:
        """Finer reporting group: the source, or ``3mos/<sensor prefix>`` for 3MOS tiles."""
        if self.source == "3mos":
            return "3mos/" + self.id.split("/")[-1].split("_")[0]
        return self.source

    def gt_transform(self) -> np.ndarray | None:
        """The GT optical -> SAR transform: ``H``, or a least-squares homography (>= 4 points)
        or affine (3 points) fitted to the check points; ``None`` if neither is possible."""
        if self.H is not None:
            return self.H
        if self.points is None or len(self.points) < 3:
            return None
        p0, p1 = self.points[:, :2].astype(np.float64), self.points[:, 2:].astype(np.float64)
        if len(p0) >= 4:
            h, _ = cv2.findHomography(p0, p1, 0)
            return h
        m = cv2.getAffineTransform(p0[:3].astype(np.float32), p1[:3].astype(np.float32))
        return np.vstack([m, [0.0, 0.0, 1.0]])


REQUIRED_KEYS = ("id", "optical", "sar")


def read_manifest(path: str | Path, check_files: bool = True) -> list[Pair]:
    """Read a JSON-lines manifest (blank lines and lines starting with ``#`` are skipped).

    Args:
        path: manifest file.
        check_files: raise if an image file does not exist.

    Raises:
        InputError: missing/unreadable manifest, or a bad line (invalid JSON, missing key,
            malformed ``H``/``points``, neither ``H`` nor ``points``, missing image, duplicate id);
            the message starts with ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No manifest at path {path}.")
    pairs: list[Pair] = []
    seen: dict[str, str] = {}
    for lineno, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        pair = parse_line(text, path, lineno, check_files)
        if pair.id in seen:
            raise InputError(f"{pair.where}: duplicate pair id {pair.id!r} (first at {seen[pair.id]}).")
        seen[pair.id] = pair.where
        pairs.append(pair)
    if not pairs:
        raise InputError(f"{path}: the manifest has no pairs.")
    return pairs


def read_manifests(paths: Iterable[str | Path], check_files: bool = True) -> list[Pair]:
    """Read several manifests; pair ids must be unique across all of them."""
    pairs: list[Pair] = []
    seen: dict[str, str] = {}
    for path in paths:
        for pair in read_manifest(path, check_files):
            if pair.id in seen:
                raise InputError(f"{pair.where}: duplicate pair id {pair.id!r} (first at {seen[pair.id]}).")
            seen[pair.id] = pair.where
            pairs.append(pair)
    return pairs


def parse_line(text: str, manifest: Path, lineno: int, check_files: bool = True) -> Pair:
    """Parse one manifest line (see :func:`read_manifest`)."""
    where = f"{manifest}:{lineno}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}).") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise InputError(f"{where}: missing key(s) {', '.join(missing)}.")
    H = _matrix(obj.get("H"), where)
    points = _points(obj.get("points"), where)
    if H is None and points is None:
        raise InputError(f"{where}: pair {obj['id']!r} has neither 'H' nor 'points'; one is required.")
    paths = {k: (manifest.parent / str(obj[k])).resolve() for k in ("optical", "sar")}
    if check_files:
        for key, p in paths.items():
            if not p.is_file():
                raise InputError(f"{where}: {key} image {obj[key]!r} not found (looked for {p}).")
    meta = {k: v for k, v in obj.items() if k not in (*REQUIRED_KEYS, "H", "points", "source")}
    return Pair(str(obj["id"]), paths["optical"], paths["sar"], str(obj.get("source", "unknown")),
                H, points, meta, where)


def _matrix(value: Any, where: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        H = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'H' must be a 3x3 list of numbers.") from None
    if H.shape != (3, 3) or not np.isfinite(H).all():
        raise InputError(f"{where}: 'H' must be a finite 3x3 matrix, got shape {H.shape}.")
    if abs(np.linalg.det(H)) < 1e-12:
        raise InputError(f"{where}: 'H' is singular.")
    return H


def _points(value: Any, where: str) -> np.ndarray | None:
    if value is None:
        return None
    try:
        pts = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'points' must be a list of [xo, yo, xs, ys].") from None
    if pts.ndim != 2 or pts.shape[1] != 4 or len(pts) == 0 or not np.isfinite(pts).all():
        raise InputError(f"{where}: 'points' must be a non-empty list of [xo, yo, xs, ys], got shape {pts.shape}.")
    return pts
