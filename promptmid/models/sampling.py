"""Sampling dense feature maps at keypoints.

Convention (used everywhere in promptmid): a keypoint is ``(x, y)`` in pixels of the
image it was detected in, ``x`` = column, ``y`` = row, pixel centres at integer
coordinates, origin at the centre of the top-left pixel. A feature map of size
``h x w`` is assumed to cover the whole image of size ``H x W`` (cell ``j`` spans
image columns ``[j*W/w - 0.5, (j+1)*W/w - 0.5)``), which is what a backbone run on
the image resized to ``w*stride x h*stride`` produces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptmid.geometry import Size


def keypoints_to_grid(keypoints: torch.Tensor, image_size: Size) -> torch.Tensor:
    """Convert pixel keypoints to ``grid_sample`` coordinates.

    Args:
        keypoints: ``[N, 2]`` (x, y) in pixels of an image of size ``image_size``.
        image_size: :class:`~promptmid.geometry.Size` ``(W, H)`` of that image in pixels.

    Returns:
        ``[1, 1, N, 2]`` normalised coordinates in ``[-1, 1]`` for ``align_corners=False``.
    """
    scale = keypoints.new_tensor([image_size[0], image_size[1]])  # (W, H)
    grid = (keypoints + 0.5) / scale * 2.0 - 1.0
    return grid.view(1, 1, -1, 2)


def sample_features(
    feature_map: torch.Tensor, keypoints: torch.Tensor, image_size: Size
) -> torch.Tensor:
    """Bilinearly sample a dense feature map at keypoints.

    Args:
        feature_map: ``[1, C, h, w]`` features covering the whole image.
        keypoints: ``[N, 2]`` (x, y) pixel coordinates in the image.
        image_size: :class:`~promptmid.geometry.Size` ``(W, H)`` of the image in pixels.

    Returns:
        ``[N, C]`` features (not normalised).
    """
    if keypoints.numel() == 0:
        return feature_map.new_zeros((0, feature_map.shape[1]))
    grid = keypoints_to_grid(keypoints.to(feature_map.dtype), image_size)
    out = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0, :].t().contiguous()
