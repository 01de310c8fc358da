"""Shared fixtures: generated pairs, the real-data folder, small images on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from promptmid.synth import make_pair

torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA_ROOT = Path(os.environ.get("PROMPTMID_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "optsar"))


@pytest.fixture(scope="session")
def demo_pair():
    """The generated pair used by `promptmid demo` (default seed)."""
    return make_pair(512, seed=7)


@pytest.fixture(scope="session")
def optsar_root() -> Path:
    """The real optical-SAR pairs folder; tests using it skip when it is absent."""
    if not (DATA_ROOT / "all.jsonl").is_file():
        pytest.skip(f"real optical-SAR data not found at {DATA_ROOT} (set PROMPTMID_DATA to its folder)")
    return DATA_ROOT


def read_manifest_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def matcher_xfeat():
    from promptmid.api import Matcher

    return Matcher("xfeat")


@pytest.fixture(scope="session")
def matcher_lite():
    from promptmid.api import Matcher

    return Matcher("lite")


def write_tif(path: Path, array: np.ndarray, **profile) -> Path:
    """Write ``[H, W]`` or ``[H, W, C]`` as a TIFF (any dtype) with rasterio."""
    from promptmid.io import open_for_write

    data = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    base = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
            "dtype": str(data.dtype)}
    with open_for_write(path, {**base, **profile}) as dst:
        dst.write(data)
    return path
