"""Weak and strong views of unlabeled patches, and CutMix, built from batchgeneratorsv2 pieces.

The weak view is nnU-Net's own spatial augmentation plus mirroring (no intensity change), so pseudo-labels come
from images that look like the ones the network is trained on. Two strong views are independent draws of
stronger intensity perturbations of that same weak patch (UniMatch's colour jitter and blur, in the intensity
language of medical images). The loader hands out ``[weak, strong1, strong2]`` stacked along the channel axis,
because nnU-Net's data loader only carries ``image`` and ``segmentation`` through its workers.
"""

from __future__ import annotations

import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

NUM_VIEWS = 3  # weak, strong1, strong2


def strong_intensity_transforms(ignore_axes: tuple[int, ...] | None = None) -> ComposeTransforms:
    """Stronger-than-nnU-Net intensity perturbations plus blur (one independent draw per call)."""
    return ComposeTransforms([
        RandomTransform(MultiplicativeBrightnessTransform(
            multiplier_range=BGContrast((0.6, 1.4)), synchronize_channels=False, p_per_channel=1),
            apply_probability=0.8),
        RandomTransform(ContrastTransform(
            contrast_range=BGContrast((0.6, 1.4)), preserve_range=True, synchronize_channels=False,
            p_per_channel=1), apply_probability=0.8),
        RandomTransform(GammaTransform(
            gamma=BGContrast((0.6, 1.6)), p_invert_image=0, synchronize_channels=False, p_per_channel=1,
            p_retain_stats=1), apply_probability=0.5),
        RandomTransform(GaussianNoiseTransform(
            noise_variance=(0, 0.15), p_per_channel=1, synchronize_channels=True), apply_probability=0.3),
        RandomTransform(GaussianBlurTransform(
            blur_sigma=(0.1, 2.0), synchronize_channels=False, synchronize_axes=False, p_per_channel=1,
            benchmark=False), apply_probability=0.5),
        RandomTransform(SimulateLowResolutionTransform(
            scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True, ignore_axes=ignore_axes,
            allowed_channels=None, p_per_channel=0.5), apply_probability=0.25),
    ])


class StackStrongViewsTransform(ImageOnlyTransform):
    """Append two independent strong views of the (weak) image along the channel axis."""

    def __init__(self, strong: BasicTransform):
        super().__init__()
        self.strong = strong

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        views = [img] + [self.strong(image=img.clone())["image"] for _ in range(NUM_VIEWS - 1)]
        return torch.cat(views, dim=0)


def get_unlabeled_transforms(patch_size: np.ndarray | tuple[int, ...], rotation_for_DA: RandomScalar,
                             mirror_axes: tuple[int, ...] | None, do_dummy_2d_data_aug: bool) -> ComposeTransforms:
    """Weak view = nnU-Net's spatial augmentation and mirroring; then two strong views stacked on channels.

    The segmentation channels (nonzero mask, and the SAM-2 pseudo-label map when present) are warped with the
    image, so SAM's labels stay aligned with the weak view.
    """
    transforms: list[BasicTransform] = []
    if do_dummy_2d_data_aug:
        transforms.append(Convert3DTo2DTransform())
        patch_size_spatial = tuple(patch_size[1:])
    else:
        patch_size_spatial = tuple(patch_size)
    transforms.append(SpatialTransform(
        patch_size_spatial, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
        p_rotation=0.2, rotation=rotation_for_DA, p_scaling=0.2, scaling=(0.7, 1.4),
        p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, border_mode_seg="constant",
        padding_value_seg=-1))
    if do_dummy_2d_data_aug:
        transforms.append(Convert2DTo3DTransform())
    if mirror_axes is not None and len(mirror_axes) > 0:
        transforms.append(MirrorTransform(allowed_axes=mirror_axes))
    transforms.append(StackStrongViewsTransform(
        strong_intensity_transforms(ignore_axes=(0,) if do_dummy_2d_data_aug else None)))
    return ComposeTransforms(transforms)


def cutmix_masks(batch_size: int, spatial_shape: tuple[int, ...], p: float = 0.5, size_min: float = 0.02,
                 size_max: float = 0.4, ratio_min: float = 0.3, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """One random box per sample (bool, shape (B, *spatial)), empty with probability 1-p; 2D and 3D alike.

    The box covers a fraction in [size_min, size_max] of the patch; side ratios are drawn in [ratio_min, 1/ratio_min]
    as in UniMatch, generalised to any number of axes.
    """
    ndim = len(spatial_shape)
    masks = torch.zeros((batch_size, *spatial_shape), dtype=torch.bool, device=device)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=generator)

    for b in range(batch_size):
        if rand(1).item() > p:
            continue
        frac = size_min + (size_max - size_min) * rand(1).item()
        log_ratios = ((rand(ndim) * 2 - 1) * abs(np.log(ratio_min)) / 2).numpy()
        log_ratios -= log_ratios.mean()  # keep the product of the side ratios at 1
        sides = [min(s, max(1, round(s * frac ** (1 / ndim) * float(np.exp(r)))))
                 for s, r in zip(spatial_shape, log_ratios)]
        starts = [int(rand(1).item() * (s - side + 1)) for s, side in zip(spatial_shape, sides)]
        masks[(b, *[slice(st, st + side) for st, side in zip(starts, sides)])] = True
    return masks


def apply_cutmix(x: torch.Tensor, partner: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paste ``partner`` into ``x`` inside ``mask`` (B, *spatial); x may carry a channel axis, mask never does."""
    m = mask if x.dim() == mask.dim() else mask.unsqueeze(1)
    return torch.where(m, partner, x)
