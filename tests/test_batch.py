"""``promptmid batch`` on a 2-worker LocalCluster (processes): a broken pair, a resumed run."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from promptmid import synth
from promptmid.cli import app
from promptmid.distributed import BatchOptions, read_pairs, run_batch

SCENE = {"tile": 512, "search_radius": "150m", "figures": False}


def _pairs_file(tmp_path: Path) -> Path:
    for seed in (1, 2, 3):
        synth.write_synthetic_geo_pair(tmp_path / f"p{seed}", 384, seed=seed, rotation_deg=0.5, shift_m=(40, -30),
                                     towns=False)
    (tmp_path / "broken.tif").write_text("not a raster")
    lines = [{"id": f"p{s}", "optical": f"p{s}/optical.tif", "sar": f"p{s}/sar.tif"} for s in (1, 2, 3)]
    lines.insert(1, {"id": "broken", "optical": "p1/optical.tif", "sar": "broken.tif"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_read_pairs_reports_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text('{"id": "a", "optical": "o.tif", "sar": "s.tif"}\nnot json\n')
    pairs = read_pairs(tmp_path / "x.jsonl")
    assert pairs[0].optical == str(tmp_path / "o.tif") and pairs[1].error.startswith("line 2")


def test_batch_broken_pair_and_resume(tmp_path: Path) -> None:
    pairs = _pairs_file(tmp_path)
    out = tmp_path / "out"
    s = run_batch(pairs, out, BatchOptions("xfeat", scene=SCENE), workers=2)
    status = {r["id"]: r["status"] for r in s["pairs"]}
    assert status == {"p1": "ok", "broken": "error", "p2": "ok", "p3": "ok"}, s["pairs"]
    broken = json.loads((out / "broken" / "result.json").read_text())
    assert "broken.tif" in broken["reason"]
    # models load once per worker process: never more loads than one per process
    pids = {r["worker_pid"] for r in s["pairs"] if r["status"] == "ok"}
    assert 1 <= len(pids) <= 2 and all(r["matcher_loads"] == 1 for r in s["pairs"] if r["status"] == "ok")
    mtime = (out / "p2" / "result.json").stat().st_mtime_ns
    # resume through the CLI: finished pairs skipped, the broken one retried and reported, exit 5
    res = CliRunner().invoke(app, ["batch", str(pairs), "--out", str(out), "-p", "xfeat", "--workers", "1",
                                   "--tile", "512", "--search-radius", "150m", "--no-figures", "--json"])
    assert res.exit_code == 5, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ran"] == 1 and summary["skipped"] == 3
    assert [r["status"] for r in summary["pairs"]] == ["skipped", "error", "skipped", "skipped"]
    assert (out / "p2" / "result.json").stat().st_mtime_ns == mtime


def test_bad_ids_and_malformed_lines_never_collide(tmp_path: Path) -> None:
    long_id = "a" * 300
    lines = ['{"id": "pair-0002", "optical": "o.tif", "sar": "s.tif"}', "not json",
             json.dumps({"id": long_id, "optical": "o.tif", "sar": "s.tif"})]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    pairs = read_pairs(tmp_path / "x.jsonl")  # no 'duplicate id' although line 2's default id would be pair-0002
    assert [p.id for p in pairs] == ["pair-0002", "~line-0002", "~line-0003"]
    assert pairs[1].error.startswith("line 2: not a pair") and "300 characters" in pairs[2].error
    s = run_batch(tmp_path / "x.jsonl", tmp_path / "out", BatchOptions("xfeat", scene=SCENE), workers=1)
    rows = {r["id"]: r for r in s["pairs"]}
    assert rows["~line-0003"]["status"] == "error" and "300 characters" in rows["~line-0003"]["reason"]
