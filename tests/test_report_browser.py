"""report.html and summary.html in a real headless browser (Debian's Chromium through its ChromeDriver).

`.ci/run` installs `chromium` and `chromium-driver`; where they are absent these tests skip with a message. Each
page must load with no console error and no network request, its viewers must draw non-blank canvases, moving the
swipe control must change what is shown, and a screenshot must show the page's structure (verdict above viewer).
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from promptmid import synth
from promptmid.cli import app

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium and ChromeDriver not installed "
                                "(apt-get install chromium chromium-driver; .ci/run does)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage", "--window-size=1200,1600",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def _open(driver, page: Path) -> None:
    driver.get_log("browser"), driver.get_log("performance")  # drop what earlier pages left
    driver.get(page.resolve().as_uri())
    deadline = time.time() + 20
    while time.time() < deadline and not driver.execute_script(
            "return Array.from(document.images).every(i => i.complete) && document.readyState === 'complete'"):
        time.sleep(0.1)


def _quiet_and_offline(driver) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    urls = [json.loads(e["message"])["message"].get("params", {}).get("request", {}).get("url", "")
            for e in driver.get_log("performance")]
    network = [u for u in urls if u and not u.startswith(("file:", "data:"))]
    assert not network, network


def _canvas_stats(driver, x0: float, x1: float) -> tuple[float, float]:
    """Mean and standard deviation of the viewer canvas's pixels between x0 and x1 (shares of its width)."""
    return tuple(driver.execute_script("""
        const c = document.querySelector('section.viewer canvas'), g = c.getContext('2d');
        const a = Math.floor(arguments[0] * c.width), b = Math.floor(arguments[1] * c.width);
        const d = g.getImageData(a, 0, b - a, c.height).data; let s = 0, q = 0, n = 0;
        for (let i = 0; i < d.length; i += 4) { const v = (d[i] + d[i + 1] + d[i + 2]) / 3; s += v; q += v * v; n++; }
        const m = s / n; return [m, Math.sqrt(Math.max(0, q / n - m * m))];""", x0, x1))


def _set_swipe(driver, value: int) -> None:
    driver.execute_script("""const r = document.querySelector('section.viewer input.swipe'); r.value = arguments[0];
        r.dispatchEvent(new Event('input'));""", value)


def _structure(driver) -> None:
    from PIL import Image

    png = driver.get_screenshot_as_png()
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("L"), float)
    assert shot.shape[0] > 500 and shot.shape[1] > 800 and shot.std() > 10  # a page, not a blank window
    top = driver.execute_script("return [document.querySelector('#verdict').getBoundingClientRect().top, "
                                "document.querySelector('section.viewer').getBoundingClientRect().top]")
    assert top[0] < top[1]


@pytest.fixture(scope="module")
def match_report(tmp_path_factory) -> Path:
    from promptmid.demo import write_demo_inputs

    root = tmp_path_factory.mktemp("report_match")
    pair = synth.make_pair(384, seed=3)
    opt, sar = write_demo_inputs(root / "in", pair.optical, pair.sar)
    res = CliRunner().invoke(app, ["match", str(opt), str(sar), "--out", str(root / "out"), "-p", "xfeat", "-q"])
    assert res.exit_code in (0, 6), res.output
    return root / "out"


def test_match_report_in_the_browser(browser, match_report: Path) -> None:
    page = match_report / "report.html"
    assert page.is_file() and page.stat().st_size < 3e6
    _open(browser, page)
    _quiet_and_offline(browser)
    status = json.loads((match_report / "result.json").read_text())["status"]
    assert browser.find_element("css selector", "#verdict .badge").text == status
    left, right = _canvas_stats(browser, 0.55, 0.95)[1], _canvas_stats(browser, 0.05, 0.45)[1]
    assert left > 5 and right > 5  # both halves show an image
    _set_swipe(browser, 100)  # most of the view becomes the registered SAR
    before = _canvas_stats(browser, 0.3, 0.45)
    _set_swipe(browser, 1000)  # all optical
    after = _canvas_stats(browser, 0.3, 0.45)
    assert abs(before[0] - after[0]) + abs(before[1] - after[1]) > 3, (before, after)
    _structure(browser)


def test_match_report_zoom_and_flicker(browser, match_report: Path) -> None:
    _open(browser, match_report / "report.html")
    browser.execute_script("document.querySelector('input[name=mode][value=flicker]').click()")
    frames = set()
    for _ in range(8):
        frames.add(round(_canvas_stats(browser, 0.1, 0.9)[0], 1))
        time.sleep(0.25)
    assert len(frames) >= 2  # the view alternates between the two layers
    zoom0 = browser.execute_script("return document.querySelector('section.viewer').viewerState.zoom")
    canvas = browser.find_element("css selector", "section.viewer canvas")
    browser.execute_script("arguments[0].dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: 200, "
                           "clientY: 200, bubbles: true, cancelable: true}))", canvas)
    assert browser.execute_script("return document.querySelector('section.viewer').viewerState.zoom") > zoom0
    _quiet_and_offline(browser)


def test_scene_report_in_the_browser(browser, tmp_path: Path) -> None:
    pair = synth.write_synthetic_geo_pair(tmp_path / "in", 512, seed=2, rotation_deg=0.5, shift_m=(30, 20),
                                          towns=False)
    out = tmp_path / "scene"
    res = CliRunner().invoke(app, ["scene", str(pair["optical"]), str(pair["sar"]), "--out", str(out), "-p", "xfeat",
                                   "--tile", "512", "--search-radius", "100m", "--quiet"])
    assert res.exit_code in (0, 6), res.output
    _open(browser, out / "report.html")
    _quiet_and_offline(browser)
    options = browser.execute_script("return Array.from(document.querySelectorAll('section.viewer select.other "
                                     "option')).map(o => o.value)")
    assert options == ["registered SAR", "SAR under the prior"]
    assert _canvas_stats(browser, 0.05, 0.95)[1] > 5
    assert browser.find_elements("css selector", "#tiles table tr")  # the tile table
    _structure(browser)


def test_eval_summary_gallery_in_the_browser(browser, tmp_path: Path) -> None:
    from promptmid.demo import write_demo_inputs
    from promptmid.evaluation.manifest import read_manifest
    from promptmid.evaluation.runner import run_and_report
    from promptmid.evaluation.runner import EvalConfig

    pair = synth.make_pair(256, seed=5)
    opt, sar = write_demo_inputs(tmp_path / "img", pair.optical, pair.sar)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "gen/1", "optical": str(opt), "sar": str(sar), "H": pair.H.tolist(),
                                    "source": "gen"}))
    run_and_report(read_manifest(manifest), EvalConfig(["sift-ratio"], models=("affine",)), tmp_path / "out")
    _open(browser, tmp_path / "out" / "summary.html")
    _quiet_and_offline(browser)
    assert browser.find_elements("css selector", "#summary table")
    browser.find_element("css selector", "tr.clickable").click()
    src = browser.execute_script("return document.getElementById('gallery-image').src")
    assert src.startswith("data:image/jpeg")
    assert browser.execute_script("return document.getElementById('gallery-image').naturalWidth") > 50
