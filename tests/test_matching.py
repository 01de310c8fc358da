"""Mutual nearest neighbours, guided matching and robust fitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from promptmid.geometry import apply_transform, residuals
from promptmid.matching import fit_geometry, guided_matches, mutual_nearest_neighbours


def _affine(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty], [0, 0, 1]])


def test_mnn_finds_permutation():
    d0 = F.normalize(torch.randn(50, 32), dim=-1)
    perm = torch.randperm(50)
    d1 = d0[perm] + 0.01 * torch.randn(50, 32)
    matches, scores = mutual_nearest_neighbours(d0, F.normalize(d1, dim=-1))
    assert len(matches) == 50
    assert (perm[matches[:, 1]].numpy() == matches[:, 0]).all()
    assert (scores > 0.9).all()


def test_mnn_ratio_and_similarity_filters():
    d0 = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    d1 = F.normalize(torch.tensor([[1.0, 0.05], [1.0, -0.05], [0.0, 1.0]]), dim=-1)
    m_all, _ = mutual_nearest_neighbours(d0, d1)
    m_ratio, _ = mutual_nearest_neighbours(d0, d1, ratio=0.8)
    assert len(m_all) == 2 and len(m_ratio) == 1 and m_ratio[0].tolist() == [1, 2]
    assert len(mutual_nearest_neighbours(d0, d1, min_similarity=1.01)[0]) == 0
    assert mutual_nearest_neighbours(d0[:0], d1)[0].shape == (0, 2)


@settings(max_examples=25, deadline=None)
@given(angle=st.floats(-60, 60), scale=st.floats(0.6, 1.6), tx=st.floats(-50, 50), ty=st.floats(-50, 50))
def test_affine_fit_recovers_transform_with_outliers(angle, scale, tx, ty):
    rng = np.random.default_rng(0)
    H = _affine(angle, scale, tx, ty)
    p0 = rng.uniform(0, 500, (120, 2))
    p1 = apply_transform(H, p0) + rng.normal(0, 0.3, (120, 2))
    p1[:40] = rng.uniform(0, 500, (40, 2))  # a third are outliers
    g = fit_geometry(p0, p1, "affine", threshold=3.0)
    assert g.ok and g.num_inliers >= 75
    grid = rng.uniform(0, 500, (20, 2))
    assert residuals(g.matrix, grid, apply_transform(H, grid)).max() < 1.0
    assert g.rmse < 1.0


@pytest.mark.parametrize("angle, scale", [(0.0, 1.0), (25.0, 0.8), (-40.0, 1.3)])
def test_similarity_fit_recovers_transform_with_outliers(angle, scale):
    """The similarity model (--geometry similarity; OpenCV's partial affine takes RANSAC, not the USAC methods)."""
    rng = np.random.default_rng(2)
    H = _affine(angle, scale, 12.0, -7.0)
    p0 = rng.uniform(0, 500, (80, 2))
    p1 = apply_transform(H, p0) + rng.normal(0, 0.3, (80, 2))
    p1[:20] = rng.uniform(0, 500, (20, 2))
    g = fit_geometry(p0, p1, "similarity", threshold=3.0)
    assert g.ok and g.num_inliers >= 55 and g.model == "similarity"
    grid = rng.uniform(0, 500, (20, 2))
    assert residuals(g.matrix, grid, apply_transform(H, grid)).max() < 1.0


def test_homography_fit():
    H = np.array([[1.05, 0.02, 10], [-0.03, 0.97, -5], [1e-4, -5e-5, 1.0]])
    p0 = np.random.default_rng(1).uniform(0, 400, (60, 2))
    g = fit_geometry(p0, apply_transform(H, p0), "homography")
    assert g.ok and np.allclose(g.matrix / g.matrix[2, 2], H, atol=1e-3)


def test_too_few_matches_fail_without_inventing_a_transform():
    p = np.random.default_rng(2).uniform(0, 100, (4, 2))
    g = fit_geometry(p, p + 1, "affine", min_inliers=6)
    assert not g.ok and g.matrix is None and "needs at least 6" in g.reason
    g = fit_geometry(np.random.default_rng(3).uniform(0, 100, (30, 2)),
                     np.random.default_rng(4).uniform(0, 100, (30, 2)), "affine")
    assert not g.ok and g.matrix is None


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="Unknown geometry model"):
        fit_geometry(np.zeros((10, 2)), np.zeros((10, 2)), "poly7")


def test_guided_matching_restricts_to_the_predicted_neighbourhood():
    rng = np.random.default_rng(5)
    k0 = rng.uniform(0, 200, (30, 2))
    H = _affine(0, 1, 20, 0)
    k1 = apply_transform(H, k0)
    d0 = F.normalize(torch.randn(30, 16), dim=-1)
    d1 = d0[torch.roll(torch.arange(30), 1)]
    # descriptors of image 1 are shifted by one: plain MNN pairs i with i+1, guided matching keeps (i, i)
    plain, _ = mutual_nearest_neighbours(d0, d1)
    assert (plain[:, 1] == (plain[:, 0] + 1) % 30).all()
    m, _ = guided_matches(d0, d1, k0, k1, H, radius=0.5)
    assert (m[:, 0] == m[:, 1]).all() and len(m) == 30
    m_far, _ = guided_matches(d0, d1, k0, k1, np.eye(3), radius=0.5)
    assert len(m_far) == 0


def test_search_rotations_keeps_the_first_angle_with_most_inliers():
    from promptmid.matching import search_rotations

    inliers = {0.0: 5, 90.0: 12, 180.0: 12, 270.0: 3}
    angle, trial, scores = search_rotations([0, 90, 180, 270], lambda a: ("fit", inliers[a]), lambda t: t[1])
    assert angle == 90.0 and trial == ("fit", 12)
    assert scores == {"0": 5, "90": 12, "180": 12, "270": 3}
    with pytest.raises(ValueError):
        search_rotations([], lambda a: a, lambda t: 0)
