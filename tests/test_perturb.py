"""The displaced (perturbed) evaluation protocol: composed ground truth, determinism, kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from promptmid.evaluation.manifest import Pair
from promptmid.evaluation.perturb import KINDS, Perturbation, compose_truth, perturb_pair
from promptmid.geometry import affine_about_centre, apply_transform
from tests.conftest import write_tif


def _dot_image(size: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """Zero image (h, w) with 3x3 bright squares (value 200) centred on integer ``points``."""
    w, h = size
    img = np.full((h, w), 20, np.uint8)
    for x, y in np.round(points).astype(int):
        img[y - 1:y + 2, x - 1:x + 2] = 200
    return img


def _brightest(img: np.ndarray) -> np.ndarray:
    """(x, y) centroid of the pixels above half of the maximum."""
    ys, xs = np.nonzero(img >= img.max() / 2)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("kind", KINDS)
def test_composed_truth_follows_the_warped_image(tmp_path: Path, kind: str):
    """A marker at a check point's SAR position ends up where the composed GT and points say."""
    size = (160, 120)
    xs_ys = np.array([[70.0, 55.0]])
    xo_yo = xs_ys - [10.0, 5.0]  # optical -> SAR is a shift by (10, 5)
    sar = write_tif(tmp_path / "sar.tif", _dot_image(size, xs_ys))
    H = np.array([[1.0, 0, 10.0], [0, 1.0, 5.0], [0, 0, 1.0]])
    pair = Pair("t/p1", tmp_path / "opt.tif", sar, H=H, points=np.concatenate([xo_yo, xs_ys], axis=1))
    moved, raster = perturb_pair(pair, Perturbation(3, kind))
    found = _brightest(raster.data[..., 0].astype(float))
    expected = apply_transform(moved.H, xo_yo)[0]
    assert np.linalg.norm(found - expected) < 0.75
    assert np.allclose(moved.points[:, 2:], expected[None])  # check points composed the same way
    assert np.allclose(moved.points[:, :2], xo_yo)  # the optical side is untouched
    if kind == "shift":  # the canvas grows: no content is lost, only its place in the frame changes
        assert raster.size[0] > size[0] and raster.size[1] > size[1]
        assert np.allclose(moved.H[:2, :2], np.eye(2))
    else:
        assert raster.size == size


def test_draws_are_seeded_per_pair_and_kind():
    p = Perturbation(0)
    t1, _ = p.draw("a/1", (300, 200))
    assert np.allclose(t1, Perturbation(0).draw("a/1", (300, 200))[0])
    assert not np.allclose(t1, p.draw("a/2", (300, 200))[0])
    assert not np.allclose(t1, Perturbation(1).draw("a/1", (300, 200))[0])
    # the standard draw respects its ranges: scale and rotation of the linear part
    for i in range(50):
        t, _ = p.draw(f"x/{i}", (300, 200))
        lin = t[:2, :2]
        assert 0.8 * 0.9 < np.sqrt(abs(np.linalg.det(lin))) < 1.25 * 1.1
        angle = np.degrees(np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1]))
        assert abs(angle) < 15 + 6  # rotation +-15 plus what the shear adds
        assert np.all(np.abs(t[:2, 2] - (np.eye(2) - lin) @ [149.5, 99.5]) <= [0.15 * 300 + 1e-9, 0.15 * 200 + 1e-9])


def test_unknown_kind_and_identity_protocol(tmp_path: Path):
    with pytest.raises(ValueError, match="valid: standard"):
        Perturbation(0, "sideways")
    sar = write_tif(tmp_path / "s.tif", np.zeros((20, 30), np.uint8))
    pair = Pair("t/p", tmp_path / "o.tif", sar, H=np.eye(3))
    same, raster = perturb_pair(pair, None)
    assert same is pair and raster.size == (30, 20)


def test_affine_about_centre_keeps_the_centre():
    t = affine_about_centre((101, 51), 33.0, 1.2, 0.0)
    assert np.allclose(apply_transform(t, np.array([[50.0, 25.0]])), [[50.0, 25.0]])
    assert np.allclose(compose_truth(Pair("a", Path("o"), Path("s"), H=np.eye(3)), t).H, t)
