"""Output folders and files shared by every command: prepared (refused when in use), staged, JSON written atomically,
figures on a non-interactive matplotlib backend (:func:`pyplot`).

Nothing the user gave is overwritten: an existing non-empty folder needs ``overwrite``, an input under a product's
name is refused (exit 3), and products are written into a hidden staging folder and moved into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from promptmid.errors import OutputExistsError


def refuse_inputs_among_products(out: str | Path, *inputs: str | Path, products: tuple[str, ...]) -> None:
    """Refuse (exit 3) when an input file is one of the products that would be written into ``out``.

    Raises:
        OutputExistsError: naming the input that would be overwritten.
    """
    targets = {(Path(out) / name).resolve() for name in products}
    for item in inputs:
        if isinstance(item, (str, Path)) and Path(item).resolve() in targets:
            raise OutputExistsError(f"{item} is an input and would be overwritten by an output of the same name in "
                                    f"{out}; choose another --out.")


STAGING_PREFIXES = (".promptmid-products-", ".promptmid-write-test-")  # our hidden staging entries in --out


def prepare_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Create ``out``; refuse a non-empty existing directory unless ``overwrite``.

    Hidden staging folders left by a killed run of ours do not count as content; ``overwrite`` removes them.

    Raises:
        OutputExistsError: ``out`` exists (non-empty, or is a file) and ``overwrite`` is False.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory.")
    ours = [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIXES)] if out.exists() else []
    if out.exists() and any(p not in ours for p in out.iterdir()) and not overwrite:
        raise OutputExistsError(f"Output directory {out} exists and is not empty; pass --overwrite to replace its files.")
    for stale in ours if overwrite else ():  # a killed run's staging: ours, hidden, never a user's file
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".promptmid-write-test-"):
            pass  # checked before any work is done, not after a long registration
    except OSError as exc:
        raise OutputExistsError(f"Output directory {out} is not writable: {exc.strerror or exc}.") from None
    return out


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename), so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
    shutil.move(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


@contextmanager
def staged_products(out: Path, products: tuple[str, ...]) -> Iterator[Path]:
    """A hidden staging folder in ``out`` to write products into; when the block ends without error, every file
    named in ``products`` is removed from ``out`` (an earlier run's products that this run does not write, e.g. the
    registered SAR of a pair that now fails) and the staged files are moved into place, ``result.json`` last. On
    an error (or a kill) ``out`` keeps what it had; the staging folder is removed (or ignored and cleared by
    :func:`prepare_out_dir` after a kill)."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIXES[0]))
    try:
        yield staging
        for name in products:
            (out / name).unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "result.json"):  # result.json last
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, selected only when a figure is written
    (importing this module leaves the process's backend alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
