"""Keypoint extraction (XFeat, SIFT and grid detectors) and the descriptor stage."""

from __future__ import annotations

import pytest
import torch

from promptmid.descriptor import Describer
from promptmid.io import image_tensor
from promptmid.io import load_image
from promptmid.models.aggregation import ConcatFusion
from promptmid.models.keypoints import KeypointExtractor
from promptmid.models.sampling import sample_features


@pytest.fixture(scope="module")
def optical(demo_pair):
    return load_image(demo_pair.optical, "optical")


@pytest.mark.parametrize("detector", ["xfeat", "sift", "grid"])
def test_detectors_give_normalised_descriptors_inside_the_image(optical, detector):
    out = KeypointExtractor(detector=detector, top_k=300)(image_tensor(optical.image), optical.valid)
    k, d = out["keypoints"], out["descriptors"]
    assert 50 <= len(k) <= 300 and k.shape[1] == 2 and d.shape == (len(k), 64)
    assert torch.allclose(d.norm(dim=-1), torch.ones(len(k)), atol=1e-4)
    h, w = optical.image.shape[:2]
    assert (k[:, 0] >= 0).all() and (k[:, 0] <= w - 1).all() and (k[:, 1] >= 0).all() and (k[:, 1] <= h - 1).all()
    assert (out["scores"][:-1] >= out["scores"][1:]).all()  # sorted, best first


def test_invalid_pixels_get_no_keypoints(optical):
    valid = optical.valid.copy()
    valid[:, :256] = False
    out = KeypointExtractor(top_k=500, mask_margin=4)(image_tensor(optical.image), valid)
    assert len(out["keypoints"]) > 0 and (out["keypoints"][:, 0] >= 256 + 4 - 0.5).all()


def test_unknown_options_are_refused():
    with pytest.raises(ValueError, match="Unknown keypoint option"):
        KeypointExtractor(topk=10)
    with pytest.raises(ValueError, match="Unknown detector"):
        KeypointExtractor(detector="orb")


def test_sampling_follows_pixel_centres():
    fmap = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)  # value = 4*row + col, one cell per 2x2 px
    kpts = torch.tensor([[0.5, 0.5], [6.5, 2.5]])  # centres of cells (0, 0) and (row 1, col 3) of an 8x8 image
    assert torch.allclose(sample_features(fmap, kpts, (8, 8))[:, 0], torch.tensor([0.0, 7.0]))


def test_concat_fusion_weights_groups_by_norm():
    feats = {"xfeat": torch.randn(5, 64), "dinov2_l4": torch.randn(5, 8), "dinov2_l8": torch.randn(5, 8)}
    out = ConcatFusion({"xfeat": 1.0, "dinov2": 0.5})(feats, torch.zeros(5, 2), (10, 10))
    assert out.shape == (5, 80) and torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-5)
    # sources are concatenated in sorted key order; the two DINOv2 layers together weigh 0.5 against XFeat's 1.0
    ratio = out[:, :16].norm(dim=-1) / out[:, 16:].norm(dim=-1)
    assert torch.allclose(ratio, torch.full((5,), 0.5), atol=1e-4)


def test_describer_output_contract(optical):
    out = Describer({"top_k": 200}, {}, {"name": "concat"})(optical)
    assert set(out) == {"keypoints", "scores", "descriptors", "image_size", "timings"}
    assert out["image_size"] == (optical.image.shape[1], optical.image.shape[0]) and out["descriptors"].shape == (len(out["keypoints"]), 64)


def test_low_memory_aliked_equals_kornia(optical):
    """Our ALIKED dense map (preallocated, normalised in place, score head by rows) gives kornia's keypoints,
    scores and descriptors, on a size that needs padding."""
    from promptmid.models.keypoints import aliked_features, load_aliked_net

    net = load_aliked_net(1024, 0.2)
    image = image_tensor(optical.image)[..., :200, :232]
    with torch.inference_mode():
        ref = net(image)[0]
        kpts, scores, desc = aliked_features(net, image)
    assert len(kpts) > 50 and kpts.shape == ref.keypoints.shape
    assert torch.allclose(kpts, ref.keypoints, atol=1e-4) and torch.allclose(scores, ref.keypoint_scores, atol=1e-5)
    assert torch.allclose(desc, ref.descriptors, atol=1e-5)


def test_fast_deformable_convolution_equals_kornia():
    """Our grid_sample deformable convolution gives kornia's (torchvision's) values, offsets far outside the map
    included (corners outside count as 0)."""
    from kornia.feature.aliked.deform_conv2d import deform_conv2d as kornia_deform_conv2d

    from promptmid.models.keypoints import deform_conv2d

    gen = torch.Generator().manual_seed(0)
    for c, h, w, c_out in [(16, 20, 27, 24), (3, 2, 5, 4)]:
        x = torch.randn(1, c, h, w, generator=gen)
        offset = torch.randn(1, 18, h, w, generator=gen) * 3
        offset[0, 0, 0, 0], offset[0, 1, -1, -1] = -40.0, 55.0
        weight, bias = torch.randn(c_out, c, 3, 3, generator=gen), torch.randn(c_out, generator=gen)
        ref = kornia_deform_conv2d(x, offset, weight, bias, padding=1)
        out = deform_conv2d(x, offset, weight, bias, 1)
        assert out.shape == ref.shape and (out - ref).abs().max() < 1e-5 * ref.abs().max()


def test_aliked_detect_equals_kornia_dkd(optical):
    """Our keypoint detection on ALIKED's score map gives exactly kornia DKD's keypoints and scores."""
    from promptmid.models.keypoints import aliked_dense_map, aliked_detect, load_aliked_net

    net = load_aliked_net(1024, 0.2)
    with torch.inference_mode():
        _, score_map = aliked_dense_map(net, image_tensor(optical.image)[..., :200, :232])
        for scores in (score_map, score_map[..., 3:150, 5:97], torch.rand(1, 1, 60, 70, generator=torch.Generator().manual_seed(1))):
            ref_kpts, ref_scores, _ = net.dkd(scores)
            kpts, kpt_scores = aliked_detect(net.dkd, scores)
            assert len(kpts) > 10 and torch.equal(kpts, ref_kpts[0]) and torch.equal(kpt_scores, ref_scores[0])


def test_aliked_score_head_and_norm_equal_the_plain_operations():
    """The score head with its 1x1 convolution as a matrix product, and the channel norm summed plane by plane, give
    what the plain operations give (to float rounding), also for a head whose first layer is not 1x1."""
    from promptmid.models.keypoints import _channel_norm, _score_head, load_aliked_net

    dense = torch.randn(1, 128, 37, 53, generator=torch.Generator().manual_seed(0))
    head = load_aliked_net(1024, 0.2).score_head
    other = torch.nn.Sequential(torch.nn.Conv2d(128, 4, 3, padding=1), torch.nn.SELU(), torch.nn.Conv2d(4, 1, 1))
    with torch.inference_mode():
        for h in (head, other):
            ref = h(dense)
            assert torch.allclose(_score_head(h, dense), ref, atol=1e-5 * ref.abs().max().item())
        assert torch.allclose(_channel_norm(dense), dense.norm(dim=1, keepdim=True), rtol=1e-6)
