"""The dense affine polish of an area hypothesis (promptmid.polish)."""

from __future__ import annotations

import numpy as np
import pytest

from promptmid.evaluation.metrics import mean_corner_error
from promptmid.geometry import affine_about_centre
from promptmid.io import load_image
from promptmid.polish import _gradients, _standardised, polish_affine
from promptmid.synth import make_pair

SIZE = 384


@pytest.fixture(scope="module")
def pair():
    return make_pair(SIZE, seed=3, H=affine_about_centre((SIZE, SIZE), 7.0, 1.1, 0.03, (21.0, -14.0)))


def test_polish_recovers_an_affine_correction(pair):
    """A start off by a shear, an anisotropic scale and a shift (about 3 px at the corners) is pulled onto the truth."""
    opt, sar = load_image(pair.optical, "optical"), load_image(pair.sar, "sar")
    nudge = np.array([[1.006, 0.004, 1.5], [-0.003, 0.995, -1.2], [0, 0, 1.0]])
    start = pair.H @ nudge
    before = mean_corner_error(start, pair.H, (SIZE, SIZE))
    out = polish_affine(opt, sar, start)
    after = mean_corner_error(out.matrix, pair.H, (SIZE, SIZE))
    assert before > 2.0 and after < 1.0, (before, after)
    assert out.correlation > out.start_correlation and out.iterations > 0


def test_polish_stays_at_the_truth(pair):
    """Started at the true transform, the polish stays there (it never trades the truth for a worse correlation)."""
    opt, sar = load_image(pair.optical, "optical"), load_image(pair.sar, "sar")
    out = polish_affine(opt, sar, pair.H)
    assert mean_corner_error(out.matrix, pair.H, (SIZE, SIZE)) < 1.0
    assert out.correlation >= out.start_correlation


def test_gradients_and_standardisation_equal_the_plain_numpy_ones():
    rng = np.random.default_rng(0)
    feat = rng.random((9, 37, 50)).astype(np.float32)
    gx, gy = _gradients(feat)
    ry, rx = np.gradient(feat, axis=(1, 2))
    np.testing.assert_allclose(gx, rx, atol=1e-6)
    np.testing.assert_allclose(gy, ry, atol=1e-6)
    mask = rng.random((37, 50)) > 0.3
    values, deviation = _standardised(feat, mask)
    plain = feat[:, mask]
    np.testing.assert_allclose(deviation[:, 0], plain.std(1) + 1e-6, rtol=1e-5)
    np.testing.assert_allclose(values, (plain - plain.mean(1, keepdims=True)) / (plain.std(1, keepdims=True) + 1e-6),
                               atol=1e-5)
