"""Area-based refinement with oriented-gradient features."""

from __future__ import annotations

import numpy as np

from promptmid.geometry import corner_error
from promptmid.io import load_image
from promptmid.dense import oriented_gradient_features
from promptmid.refine import refine_transform
from promptmid.synth import make_pair


def test_features_are_normalised_channels():
    img = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    f = oriented_gradient_features(img, orientations=6)
    assert f.shape == (6, 40, 50) and f.dtype == np.float32
    assert np.allclose(np.linalg.norm(f, axis=0)[5:-5, 5:-5], 1.0, atol=1e-3)


def test_refinement_pulls_a_perturbed_transform_to_the_truth():
    pair = make_pair(512, seed=3, looks=8)
    opt = load_image(pair.optical, "optical")
    sar = load_image(pair.sar, "sar")
    shift = np.array([[1, 0, 4.0], [0, 1, -3.0], [0, 0, 1]])
    start = shift @ pair.H
    ref = refine_transform(opt.image, sar.image, start, opt.valid, sar.valid)
    before = corner_error(start, pair.H, (512, 512)).mean()
    after = corner_error(ref.matrix, pair.H, (512, 512)).mean()
    assert ref.applied and ref.blocks >= 8
    assert before > 4.5 and after < 2.0, (before, after)


def test_blocks_matched_on_threads_give_the_same_result():
    """Matching the refinement's blocks on several threads gives the same blocks, shifts and transform, in the same
    order, as one thread."""
    from promptmid.refine import block_shifts

    pair = make_pair(320, seed=5, looks=8)
    opt, sar = load_image(pair.optical, "optical"), load_image(pair.sar, "sar")
    start = np.array([[1, 0, 3.0], [0, 1, -2.0], [0, 0, 1]]) @ pair.H
    feat0, feat1 = oriented_gradient_features(opt.image.mean(-1)), oriented_gradient_features(sar.image.mean(-1))
    valid = opt.valid & sar.valid
    one = block_shifts(feat0, feat1, valid, 64, 8, 0.005)
    assert len(one[0]) >= 8
    for workers in (2, 3):
        many = block_shifts(feat0, feat1, valid, 64, 8, 0.005, workers=workers)
        assert all(np.array_equal(a, b) for a, b in zip(one, many))
    ref1 = refine_transform(opt.image, sar.image, start, opt.valid, sar.valid)
    ref2 = refine_transform(opt.image, sar.image, start, opt.valid, sar.valid, workers=2)
    assert ref1.applied and np.array_equal(ref1.matrix, ref2.matrix) and ref1.blocks == ref2.blocks


def test_refinement_is_not_applied_on_textureless_images():
    flat = np.full((200, 200), 0.5, np.float32)
    flat[100:, :] = 0.6  # one edge only: too few textured blocks
    ref = refine_transform(flat, flat, np.eye(3), np.ones((200, 200), bool), np.ones((200, 200), bool))
    assert not ref.applied and np.array_equal(ref.matrix, np.eye(3)) and ref.reason


def test_block_grid_is_capped_on_large_images():
    """The refinement's block grid keeps half-block spacing up to ~600 px and widens beyond so that at most
    ``max_blocks`` blocks are matched per pass (with 256, a 1024 px scene tile: 225 instead of 841)."""
    from promptmid.refine import grid_step

    def count(side: int, step: int, block: int = 64, search: int = 8) -> int:
        return ((side - block - 2 * search) // step + 1) ** 2

    assert grid_step((512, 512), 64, 8, 256) == 32 and grid_step((1024, 1024), 64, 8, None) == 32
    step = grid_step((1024, 1024), 64, 8, 256)
    assert count(1024, step) <= 256 < count(1024, step - 1)
