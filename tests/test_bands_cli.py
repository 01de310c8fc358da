"""The input options (bands, SAR scaling, nodata) are one definition shared by match, scene and batch."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from promptmid import synth
from promptmid.cli import app

SHARED = ("--optical-bands", "--sar-bands", "--sar-scale", "--nan-as-nodata")


def _option_help(command: str) -> dict[str, str]:
    from typer.main import get_command

    cmd = get_command(app).commands[command]  # type: ignore[attr-defined]
    return {p.opts[0]: p.help for p in cmd.params if p.opts and p.opts[0] in SHARED}


def test_match_scene_and_batch_share_the_input_options() -> None:
    helps = {c: _option_help(c) for c in ("match", "scene", "batch")}
    assert set(helps["match"]) == set(SHARED)
    assert helps["match"] == helps["scene"] == helps["batch"]


def test_scene_refuses_a_band_the_file_lacks_before_matching(tmp_path: Path) -> None:
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", 256, seed=1)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["scene", str(pair["optical"]), str(pair["sar"]), "--out", str(out), "-p", "xfeat",
                                   "--sar-bands", "3", "--quiet"])
    assert res.exit_code == 2 and "--sar-bands asks for band 3" in res.stderr, res.output
    assert "Traceback" not in res.output and not (out / "result.json").exists()
    res = CliRunner().invoke(app, ["scene", str(pair["optical"]), str(pair["sar"]), "--out", str(tmp_path / "o2"),
                                   "--optical-bands", "x", "--quiet"])
    assert res.exit_code == 2 and re.search(r"[Bb]and", res.stderr)
