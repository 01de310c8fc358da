"""Every shipped preset must find a displacement: a generated pair shifted only, and one rotated and scaled.

A descriptor that encodes image position instead of content registers aligned pairs and fails these.
"""

from __future__ import annotations

import pytest

from promptmid.api import Matcher
from promptmid.config import PRESETS
from promptmid.evaluation.metrics import mean_corner_error
from promptmid.geometry import affine_about_centre, translation
from promptmid.synth import make_pair

SIZE = 512
# ``full`` (PromptDM-small, ~15 s per pair on CPU) is left to tests/test_promptdm.py to keep the suite short
SHIPPED = [name for name in PRESETS if name != "full"]
DISPLACEMENTS = {
    "shift": translation(58.0, -41.0),  # 11 % and 8 % of the image
    "rotation+scale": affine_about_centre((SIZE, SIZE), 12.0, 1.15, 0.0, (20.0, 15.0)),
}


@pytest.fixture(scope="module")
def displaced_pairs():
    return {name: make_pair(SIZE, seed=11, H=H) for name, H in DISPLACEMENTS.items()}


@pytest.mark.parametrize("preset", SHIPPED)
def test_preset_recovers_displacements(preset: str, displaced_pairs):
    matcher = Matcher(preset)
    for name, pair in displaced_pairs.items():
        r = matcher.match(pair.optical, pair.sar)
        # the transform is what this test checks; whether QC calls it ok is tests/test_qc.py's job
        assert r.has_transform, f"{preset} on {name}: {r.reason}"
        err = mean_corner_error(r.transform, pair.H, (SIZE, SIZE))
        assert err < 2.0, f"{preset} on {name}: mean corner error {err:.1f} px"
