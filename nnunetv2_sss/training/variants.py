"""Short variants in nnU-Net's style (cf. nnUNetTrainer_5epochs): they only set attributes."""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_sss.training.run_settings import RunSettingsMixin
from nnunetv2_sss.training.semi_supervised import nnUNetTrainerSSS_noSAM, nnUNetTrainerUniMatch


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


class nnUNetTrainer_budget(RunSettingsMixin, nnUNetTrainer):
    """Stock supervised nnUNetTrainer that honours the same run settings as the SSS trainers (training length from
    nnUNet_sss_num_epochs / _iterations_per_epoch / _val_iterations_per_epoch, nnUNet_sss_seed, snapshots): the
    supervised baseline of a benchmark at an equal iteration budget and seed. Nothing else differs."""


class nnUNetTrainerSSS_noSAM_5epochs(ShortRun, nnUNetTrainerSSS_noSAM):
    short_epochs = 5


class nnUNetTrainerUniMatch_5epochs(ShortRun, nnUNetTrainerUniMatch):
    short_epochs = 5


class nnUNetTrainerSSS_noSAM_smoke(ShortRun, nnUNetTrainerSSS_noSAM):
    """A few iterations only: checks the whole pipeline (tests, CI), learns nothing."""

    short_epochs, short_iterations, short_val_iterations = 2, 3, 2
    unsup_warmup_fraction = 0.0  # plumbing: every step semi-supervised (the warm-up has tests of its own)


class nnUNetTrainerSSS_noSAM_demo(ShortRun, nnUNetTrainerSSS_noSAM):
    """The README demo: long enough on a CPU to learn the small synthetic dataset, short enough to wait for."""

    short_epochs, short_iterations, short_val_iterations = 8, 25, 5


# Ablation rows of scripts/benchmark_hippocampus.py: one change each against the default.
class nnUNetTrainerUniMatch_ratio025(nnUNetTrainerUniMatch):
    """Unlabeled batch a quarter of the labeled batch (the earlier default)."""

    unlabeled_batch_ratio = 0.25


class nnUNetTrainerUniMatch_mixdraw(nnUNetTrainerUniMatch):
    """CutMix partners from a separate loader draw (UniMatch's reference code) instead of the batch itself."""

    mix_partners = "draw"


class nnUNetTrainerUniMatch_cutmix1(nnUNetTrainerUniMatch):
    cutmix_p = 1.0


class nnUNetTrainerUniMatch_rampup(nnUNetTrainerUniMatch):
    """Unsupervised weights ramped up (sigmoid) over the first fifth of training."""

    unsup_rampup_fraction = 0.2


class nnUNetTrainerUniMatch_thr090(nnUNetTrainerUniMatch):
    confidence_threshold = 0.9


class nnUNetTrainerSSS_noSAM_dfe2(nnUNetTrainerSSS_noSAM):
    """DFE on the two deepest encoder scales only."""

    dfe_num_scales = 2


class nnUNetTrainerSSS_noSAM_ratio025(nnUNetTrainerSSS_noSAM):
    """SSS_noSAM with an unlabeled batch a quarter of the labeled: about a third of the cost per iteration on a CPU."""

    unlabeled_batch_ratio = 0.25


class nnUNetTrainerSSS_noSAM_adaptive(nnUNetTrainerSSS_noSAM):
    """SSS_noSAM with class-adaptive confidence thresholds (consistency/losses.py: ClassAdaptiveThreshold)."""

    class_adaptive_threshold = True


class nnUNetTrainerUniMatch_adaptive(nnUNetTrainerUniMatch):
    class_adaptive_threshold = True
