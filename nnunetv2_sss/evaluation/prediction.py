"""nnU-Net's own predictor, set up once for this package (the refresh's student prediction and the benchmarks).

No TTA by default: the SAM-2 refresh runs often, and the benchmarks report what ``nnUNetv2_predict --disable_tta``
gives, for every model alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def nnunet_predictor(device: torch.device | str, use_mirroring: bool = False,
                     tile_step_size: float = 0.5) -> nnUNetPredictor:
    """An uninitialised ``nnUNetPredictor``: sliding window with Gaussian weighting, quiet, everything on a GPU."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = torch.device(device)
    return nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                           perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                           verbose_preprocessing=False, allow_tqdm=False)


def predictor_from_checkpoint(checkpoint: Path, device: torch.device | str) -> nnUNetPredictor:
    """The predictor of one checkpoint file inside an nnU-Net fold folder (``.../fold_X/checkpoint_*.pth``), found
    as ``nnUNetv2_predict`` finds it (the trainer class by name: set ``nnUNet_extTrainer`` for this package's)."""
    fold = checkpoint.parent.name.split("_", 1)[1]
    predictor = nnunet_predictor(device)
    predictor.initialize_from_trained_model_folder(str(checkpoint.parent.parent),
                                                   (fold if fold == "all" else int(fold),), checkpoint.name)
    return predictor
