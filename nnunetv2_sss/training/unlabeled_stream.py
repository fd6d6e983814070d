"""The unlabeled data stream of the semi-supervised trainers: loader, views, CutMix partners and boxes, shutdown.

nnU-Net's own ``nnUNetDataLoader`` reads the preprocessed unlabeled cases (no foreground oversampling: they have no
labels) and the transforms of ``augment/views.py`` turn every patch into [weak, strong1, strong2] from one spatial
augmentation. With SAM-2 the loader's "previous stage segmentation" is the run's SAM-2 map, warped with the patch.
Background workers get seeds derived from the run's seed, as the labeled loaders do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunetv2_sss.augment.views import NUM_VIEWS, apply_cutmix, cutmix_masks, get_unlabeled_transforms


def split_batch_across_ranks(global_batch_size: int, world_size: int, rank: int) -> int:
    """This rank's share of a global batch, split exactly as nnU-Net splits the labeled batch under DDP."""
    base = global_batch_size // world_size
    return base + 1 if base * world_size + rank < global_batch_size else base


@dataclass(frozen=True)
class UnlabeledBatch:
    """One unlabeled batch as the step's hooks see it (tensors on the trainer's device; maps are (B, *spatial)).

    ``x_s1``/``x_s2`` are the strong views already CutMix'ed with their partners (``partner`` indexes each sample's
    partner in the mix batch; ``box1``/``box2`` are the boxes); ``valid`` is 1 inside the image after augmentation.
    The mix batch (``mix_*``) is this batch itself (``mix_is_batch``) or a separate loader draw."""

    x_w: torch.Tensor
    x_s1: torch.Tensor
    x_s2: torch.Tensor
    valid: torch.Tensor
    sam_map: torch.Tensor | None
    box1: torch.Tensor
    box2: torch.Tensor
    partner: torch.Tensor
    mix_w: torch.Tensor
    mix_valid: torch.Tensor
    mix_sam_map: torch.Tensor | None
    mix_is_batch: bool


def make_unlabeled_loader(folder: str, sam_maps_folder: str | None, batch_size: int, patch_size, label_manager,
                          initial_patch_size, rotation_for_DA, mirror_axes, do_dummy_2d: bool,
                          worker_seed: int | None, pin_memory: bool):
    """nnU-Net's loader over the preprocessed unlabeled cases, in nnU-Net's augmenter (in process when
    ``nnUNet_n_proc_DA`` = 0)."""
    transforms = get_unlabeled_transforms(patch_size, rotation_for_DA, mirror_axes, do_dummy_2d)
    dataset = infer_dataset_class(folder)(folder, folder_with_segs_from_previous_stage=sam_maps_folder)
    loader = nnUNetDataLoader(dataset, batch_size, initial_patch_size, patch_size, label_manager,
                              oversample_foreground_percent=0.0, transforms=transforms)
    n_proc = get_allowed_n_proc_DA()
    if n_proc == 0:
        return SingleThreadedAugmenter(loader, None)
    seeds = None if worker_seed is None else [worker_seed + i for i in range(n_proc)]
    return NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=n_proc,
                                        num_cached=max(6, n_proc // 2), seeds=seeds, pin_memory=pin_memory,
                                        wait_time=0.002)


def close_loader(loader) -> None:
    """Stop the loader's background workers (nnU-Net's ``on_train_end`` only stops its own two loaders)."""
    if isinstance(loader, NonDetMultiThreadedAugmenter):
        loader._finish()


def split_views(batch: dict, device: torch.device, with_sam_map: bool) -> tuple[torch.Tensor, ...]:
    """(weak, strong1, strong2, valid, SAM map or None) of one loader batch."""
    u = batch["data"].to(device, non_blocking=True)
    seg = batch["target"].to(device, non_blocking=True)
    c = u.shape[1] // NUM_VIEWS
    valid = (seg[:, 0] >= 0).float()
    sam_map = seg[:, 1].long() if with_sam_map and seg.shape[1] > 1 else None
    return u[:, :c], u[:, c:2 * c], u[:, 2 * c:], valid, sam_map


def random_derangement(n: int, device: torch.device) -> torch.Tensor:
    """A permutation in which no sample is its own partner (identity for n = 1)."""
    order = torch.randperm(n)
    shift = int(torch.randint(1, n, (1,)).item()) if n > 1 else 0
    partner = torch.empty_like(order)
    partner[order] = order.roll(shift)
    return partner.to(device)


def draw_unlabeled_batch(loader, device: torch.device, with_sam_map: bool, mix_partners: str,
                         cutmix_p: float) -> UnlabeledBatch:
    """The next unlabeled batch with its CutMix partners ("batch": a derangement of the batch itself; "draw": a
    second loader draw, as UniMatch's reference code) and both strong views mixed with them."""
    x_w, x_s1, x_s2, valid, sam_map = split_views(next(loader), device, with_sam_map)
    n_u, spatial = x_w.shape[0], tuple(x_w.shape[2:])
    if mix_partners == "draw":
        m_w, m_s1, m_s2, m_valid, m_sam = split_views(next(loader), device, with_sam_map)
        partner = torch.arange(n_u, device=device)
        mix_is_batch = False
    else:
        m_w, m_s1, m_s2, m_valid, m_sam = x_w, x_s1, x_s2, valid, sam_map
        partner = random_derangement(n_u, device)
        mix_is_batch = True
    mix_p = cutmix_p if (n_u > 1 or not mix_is_batch) else 0.0
    box1 = cutmix_masks(n_u, spatial, p=mix_p, device=device)
    box2 = cutmix_masks(n_u, spatial, p=mix_p, device=device)
    return UnlabeledBatch(x_w=x_w, x_s1=apply_cutmix(x_s1, m_s1[partner], box1),
                          x_s2=apply_cutmix(x_s2, m_s2[partner], box2), valid=valid, sam_map=sam_map, box1=box1,
                          box2=box2, partner=partner, mix_w=m_w, mix_valid=m_valid, mix_sam_map=m_sam,
                          mix_is_batch=mix_is_batch)
