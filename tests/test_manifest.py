"""Manifest parsing: good lines, and bad lines that must name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from promptmid.errors import InputError
from promptmid.evaluation.manifest import read_manifest, read_manifests
from promptmid.evaluation.split import split_group

H = [[1, 0, 2], [0, 1, 3], [0, 0, 1]]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for name in ("o.png", "s.png"):
        (tmp_path / "img" / name).write_bytes(b"x")
    return tmp_path


def write(folder: Path, lines: list[str], name: str = "m.jsonl") -> Path:
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def line(**kw: object) -> str:
    obj = {"id": "a/1", "optical": "img/o.png", "sar": "img/s.png", "H": H, "source": "srif"}
    obj.update(kw)
    return json.dumps({k: v for k, v in obj.items() if v is not None})


def test_good_lines(folder: Path) -> None:
    pts = [[0, 0, 2, 3], [5, 5, 7, 8]]
    path = write(folder, ["# comment", line(gt_quality="exact"), "", line(id="a/2", H=None, points=pts)])
    pairs = read_manifest(path)
    assert [p.id for p in pairs] == ["a/1", "a/2"]
    assert pairs[0].optical == (folder / "img" / "o.png").resolve()
    assert pairs[0].gt_quality == "exact" and pairs[0].where.endswith("m.jsonl:2")
    np.testing.assert_allclose(pairs[0].gt_transform(), H)
    assert pairs[1].H is None and pairs[1].points.shape == (2, 4)


def test_gt_from_points(folder: Path) -> None:
    pts = [[0, 0, 2, 3], [10, 0, 12, 3], [0, 10, 2, 13], [10, 10, 12, 13]]
    pair = read_manifest(write(folder, [line(H=None, points=pts)]))[0]
    np.testing.assert_allclose(pair.gt_transform(), H, atol=1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"id": "a/2", "optical": ', "invalid JSON"),
        (line(id="a/2", H=None), "neither 'H' nor 'points'"),
        (line(id="a/2", sar="img/missing.png"), "sar image 'img/missing.png' not found"),
        (line(id="a/2", H=[[1, 0], [0, 1]]), "3x3"),
        (line(id="a/2", points=[[1, 2, 3]]), "points"),
        (json.dumps({"id": "a/2", "sar": "img/s.png", "H": H}), "missing key(s) optical"),
        (line(), "duplicate pair id 'a/1'"),
    ],
)
def test_bad_line_names_file_and_line(folder: Path, bad: str, message: str) -> None:
    path = write(folder, [line(), bad])
    with pytest.raises(InputError) as info:
        read_manifest(path)
    assert f"{path}:2:" in str(info.value) and message in str(info.value)


def test_missing_and_empty_manifest(folder: Path) -> None:
    with pytest.raises(InputError, match="No manifest"):
        read_manifest(folder / "nope.jsonl")
    with pytest.raises(InputError, match="no pairs"):
        read_manifest(write(folder, ["# only a comment"]))


def test_duplicates_across_manifests(folder: Path) -> None:
    a, b = write(folder, [line()], "a.jsonl"), write(folder, [line()], "b.jsonl")
    with pytest.raises(InputError, match="b.jsonl:1: duplicate"):
        read_manifests([a, b])


@pytest.mark.parametrize(
    "pid, source, group",
    [("srif/pair3", "srif", "train"), ("srif/pair169", "srif", "other:srif-duplicate"),
     ("srif/pair190", "srif", "val"), ("3mos/GF3_city_0", "3mos", "train"),
     ("3mos/SEN_hills_2", "3mos", "unseen:3mos-Sentinel-1"), ("msg/pair8", "msg", "unseen:other-sensors"),
     ("osmnet/x", "osmnet", "near")],
)
def test_split_groups(folder: Path, pid: str, source: str, group: str) -> None:
    pair = read_manifest(write(folder, [line(id=pid, source=source)]))[0]
    assert split_group(pair) == group
