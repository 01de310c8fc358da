"""Losses over the keypoint sets of one image pair.

Positives are GT correspondences (:func:`promptmid.training.data.gt_correspondences`);
every other keypoint of the other image is a negative, so negatives are mined across the
whole image and the hardest ones dominate the softmax. Keypoints within ``ignore_radius``
px of a positive's GT location (near-duplicates of the positive) are not counted as
negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dual_softmax_loss(
    desc0: torch.Tensor, desc1: torch.Tensor, pairs: torch.Tensor, dist: torch.Tensor | None = None,
    temperature: float = 0.05, ignore_radius: float = 4.0,
) -> torch.Tensor:
    """Negative log dual-softmax probability of the positives (symmetric InfoNCE).

    Args:
        desc0: ``[N0, D]``, desc1: ``[N1, D]`` L2-normalised descriptors.
        pairs: ``[M, 2]`` positive index pairs (i0, i1).
        dist: optional ``[N0, N1]`` GT reprojection distances; entries below ``ignore_radius``
            other than the positive are masked out of the softmax.
        temperature: softmax temperature on cosine similarity.

    Returns:
        scalar loss (0 when there are no positives).
    """
    if len(pairs) == 0:
        return desc0.sum() * 0.0
    sim = desc0 @ desc1.t() / temperature
    if dist is not None and ignore_radius > 0:
        near = dist < ignore_radius
        near[pairs[:, 0], pairs[:, 1]] = False
        sim = sim.masked_fill(near, float("-inf"))
    i, j = pairs[:, 0], pairs[:, 1]
    row = F.log_softmax(sim[i], dim=1).gather(1, j[:, None])[:, 0]
    col = F.log_softmax(sim[:, j], dim=0).gather(0, i[None])[0]
    return -(row + col).mean() / 2


@torch.no_grad()
def matching_accuracy(desc0: torch.Tensor, desc1: torch.Tensor, pairs: torch.Tensor) -> float:
    """Fraction of positives whose mutual nearest neighbour is the GT partner."""
    if len(pairs) == 0:
        return float("nan")
    sim = desc0 @ desc1.t()
    nn01, nn10 = sim.argmax(1), sim.argmax(0)
    i, j = pairs[:, 0], pairs[:, 1]
    return float(((nn01[i] == j) & (nn10[j] == i)).float().mean())
