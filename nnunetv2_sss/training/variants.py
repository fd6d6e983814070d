"""Short variants in nnU-Net's style (cf. nnUNetTrainer_5epochs): they only set attributes."""

from __future__ import annotations

import torch

from nnunetv2_sss.training.sam_trainers import nnUNetTrainerSSS
from nnunetv2_sss.training.semi_supervised import nnUNetTrainerSSS_noSAM, nnUNetTrainerUniMatch
from nnunetv2_sss.training.semisam import nnUNetTrainerSemiSAM


class ShortRun:
    """Mixin: a fixed training length, applied after nnU-Net's ``__init__`` (which sets 1000 x 250 x 50).

    Subclasses set ``short_epochs`` / ``short_iterations`` / ``short_val_iterations``; None keeps the value."""

    short_epochs: int | None = None
    short_iterations: int | None = None
    short_val_iterations: int | None = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attr, value in (("num_epochs", self.short_epochs), ("num_iterations_per_epoch", self.short_iterations),
                            ("num_val_iterations_per_epoch", self.short_val_iterations)):
            if value is not None:
                setattr(self, attr, value)


class nnUNetTrainerSSS_noSAM_5epochs(ShortRun, nnUNetTrainerSSS_noSAM):
    short_epochs = 5


class nnUNetTrainerUniMatch_5epochs(ShortRun, nnUNetTrainerUniMatch):
    short_epochs = 5


class nnUNetTrainerSSS_noSAM_smoke(ShortRun, nnUNetTrainerSSS_noSAM):
    """A few iterations only: checks the whole pipeline (tests, CI), learns nothing."""

    short_epochs, short_iterations, short_val_iterations = 2, 3, 2
    unsup_warmup_fraction = 0.0  # plumbing: every step semi-supervised (the warm-up has tests of its own)


class nnUNetTrainerSSS_noSAM_demo(ShortRun, nnUNetTrainerSSS_noSAM):
    """The README demo: long enough on a CPU to learn the small synthetic dataset, short enough to wait for.

    The first 7 of 10 epochs are the supervised warm-up (a step costs about a quarter of a semi-supervised one, and
    every class is learned before pseudo-labels count); the last 3 train semi-supervised. Seeded, so reruns land close
    to each other."""

    short_epochs, short_iterations, short_val_iterations = 10, 25, 5
    unsup_warmup_fraction = 0.7
    seed = 0


# ---------------------------------------------------------------------- short variants
class _SAMSmoke(ShortRun):
    """A few iterations, a refresh after epoch 0 on 2 cases at SAM size 256: checks the pipeline, learns nothing."""

    short_epochs, short_iterations, short_val_iterations = 2, 3, 2
    unsup_warmup_fraction = 0.0  # plumbing: every step semi-supervised (the warm-up has tests of its own)
    sam_image_size = 256
    sam_warmup_fraction = 0.0  # warm-up of 1 epoch (the minimum): refresh at the end of epoch 0
    sam_refresh_every_fraction = 0.0  # every epoch
    sam_rampup_fraction = 0.0
    sam_refresh_max_cases = 2


class _SAM5Epochs(ShortRun):
    """5 epochs: 1 supervised, SAM-2 maps from the end of epoch 2 on (refreshes after epochs 2 and 3), full weight
    from epoch 4."""

    short_epochs = 5
    sam_warmup_fraction = 0.4
    sam_refresh_every_fraction = 0.0
    sam_rampup_fraction = 0.4


class nnUNetTrainerSSS_smoke(_SAMSmoke, nnUNetTrainerSSS):
    """A few iterations of the full SSS trainer with one SAM-2 refresh: the pipeline, not learning."""


class nnUNetTrainerSSS_5epochs(_SAM5Epochs, nnUNetTrainerSSS):
    """Five epochs of the full SSS trainer with two SAM-2 refreshes."""


class nnUNetTrainerSemiSAM_smoke(_SAMSmoke, nnUNetTrainerSemiSAM):
    """A few iterations of SemiSAM with one SAM-2 refresh: the pipeline, not learning."""


class nnUNetTrainerSemiSAM_5epochs(_SAM5Epochs, nnUNetTrainerSemiSAM):
    """Five epochs of SemiSAM with two SAM-2 refreshes."""
