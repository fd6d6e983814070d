"""The SAM-2 map must stay on the weak image through the unlabeled augmentation (rotation, scaling, mirroring).

The label map is encoded into the image itself (image value = label), written as a preprocessed unlabeled case,
its SAM-2 map written with the refresh's own writer, and both read back through nnU-Net's real loader
(``nnUNetDataLoader`` with ``folder_with_segs_from_previous_stage``, as the trainers do) and the real
``get_unlabeled_transforms``, with rotation and scaling switched on for every sample (their probabilities set to 1 on
the real SpatialTransform) and nnU-Net's rotation ranges and initial patch size. Inside structures (away from
edges, where interpolation of the image blurs the steps) the weak image must read the map's label; a map mirrored
against its image must not, so the check can see a drift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from scipy.ndimage import minimum_filter

from nnunetv2_sss.augment.views import NUM_VIEWS, get_unlabeled_transforms
from nnunetv2_sss.sam.refresh import write_pseudolabel

LABELS = {"background": 0, "a": 1, "b": 2, "c": 3}
DEG = np.pi / 180


def _asymmetric_labels(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Blocks of three classes at random, off-centre places: no mirror or rotation maps the pattern onto itself."""
    lab = np.zeros(shape, np.int16)
    for c in (1, 2, 3, 1, 2, 3):
        size = [max(3, s // 3) if i == len(shape) - 1 else max(2, s // 4) for i, s in enumerate(shape)]
        start = [int(rng.integers(0, s - z + 1)) for s, z in zip(shape, size)]
        lab[tuple(slice(a, a + z) for a, z in zip(start, size))] = c
    return lab


def _forced_transforms(patch_size: tuple[int, ...], rotation: tuple[float, float], mirror_axes: tuple[int, ...],
                       dummy_2d: bool):
    transforms = get_unlabeled_transforms(patch_size, rotation, mirror_axes, dummy_2d)
    spatial = [t for t in transforms.transforms if isinstance(t, SpatialTransform)]
    assert len(spatial) == 1 and any(isinstance(t, MirrorTransform) for t in transforms.transforms)
    spatial[0].p_rotation = spatial[0].p_scaling = 1.0  # every sample rotated and scaled
    return transforms


@pytest.mark.parametrize(("name", "case_shape", "patch_size", "rotation", "mirror_axes", "dummy_2d"), [
    ("2d", (3, 72, 64), (48, 40), (-180 * DEG, 180 * DEG), (0, 1), False),
    ("3d", (20, 40, 36), (16, 32, 24), (-30 * DEG, 30 * DEG), (0, 1, 2), False),
    ("3d_dummy2d", (12, 64, 56), (8, 48, 40), (-180 * DEG, 180 * DEG), (0, 1, 2), True),
])
def test_sam_map_stays_on_the_weak_image(name: str, case_shape: tuple[int, ...], patch_size: tuple[int, ...],
                                         rotation: tuple[float, float], mirror_axes: tuple[int, ...], dummy_2d: bool,
                                         tmp_path: Path) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    rng = np.random.default_rng(0)
    folder, maps = tmp_path / "nnUNetPlans_x_unlabeled", tmp_path / "fold_0" / "sam2_pseudolabels"
    folder.mkdir()
    labels = _asymmetric_labels(case_shape, rng)
    props = {"class_locations": {c: np.zeros((0, 4), dtype=np.int64) for c in (1, 2, 3)}, "spacing": [1.0] * 3}
    chunks = (1, *case_shape)
    nnUNetDatasetBlosc2.save_case(labels[None].astype(np.float32), np.zeros((1, *case_shape), np.int8), props,
                                  str(folder / "case"), chunks=chunks, blocks=chunks)
    write_pseudolabel(folder, "case", labels, num_classes=4, maps_folder=maps)

    ds = nnUNetDatasetBlosc2(str(folder), folder_with_segs_from_previous_stage=str(maps))
    dim = len(patch_size)
    initial = get_patch_size(patch_size[-dim:], rotation, rotation, rotation, (0.85, 1.25))
    if dummy_2d:
        initial[0] = patch_size[0]
    loader = nnUNetDataLoader(ds, 8, initial, patch_size, LabelManager(LABELS, None),
                              oversample_foreground_percent=0.0,
                              transforms=_forced_transforms(patch_size, rotation, mirror_axes, dummy_2d))

    agree, agree_mirrored, inside_total = 0, 0, 0
    for _ in range(3):
        batch = loader.generate_train_batch()
        data, target = batch["data"], batch["target"]
        assert data.shape[1] == NUM_VIEWS and target.shape[1] == 2  # [weak, strong1, strong2]; [mask, SAM map]
        for b in range(data.shape[0]):
            weak, sam = data[b, 0].numpy(), target[b, 1].numpy()
            # inside a structure: the SAM label is constant over a neighbourhood (2 px in-plane), and valid
            footprint = np.ones((1,) * (sam.ndim - 2) + (5, 5), bool) if dummy_2d else np.ones((5,) * sam.ndim, bool)
            same = (minimum_filter(sam, footprint=footprint) == -minimum_filter(-sam, footprint=footprint))
            inside = same & (sam >= 0) & (target[b, 0].numpy() >= 0)
            inside_total += int(inside.sum())
            agree += int((np.abs(weak - sam) < 0.5)[inside].sum())
            flipped = np.flip(sam, axis=-1)  # a drift of the kind a view-only mirroring would cause
            agree_mirrored += int((np.abs(weak - flipped) < 0.5)[inside & (flipped >= 0)].sum())
    assert inside_total > 1000, name
    assert agree / inside_total > 0.99, f"{name}: SAM map and weak image disagree inside structures"
    assert agree_mirrored / inside_total < 0.9, f"{name}: the pattern is too symmetric to see a drift"
