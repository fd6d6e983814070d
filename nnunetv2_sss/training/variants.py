"""Short variants in nnU-Net's style (cf. nnUNetTrainer_5epochs): they only set attributes."""

from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_sss.training.semi_supervised import (
    apply_budget_from_env,
    nnUNetTrainerSSS_noSAM,
    nnUNetTrainerUniMatch,
)


class nnUNetTrainer_budget(nnUNetTrainer):
    """Stock supervised nnUNetTrainer whose training length comes from the same env vars as the SSS trainers
    (nnUNet_sss_num_epochs, nnUNet_sss_iterations_per_epoch, nnUNet_sss_val_iterations_per_epoch): the
    supervised baseline of a benchmark at an equal iteration budget. Nothing else differs."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_budget_from_env(self)


class nnUNetTrainerSSS_noSAM_5epochs(nnUNetTrainerSSS_noSAM):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerUniMatch_5epochs(nnUNetTrainerUniMatch):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class nnUNetTrainerSSS_noSAM_smoke(nnUNetTrainerSSS_noSAM):
    """A few iterations only: checks the whole pipeline (tests, CI), learns nothing."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 2


class nnUNetTrainerSSS_noSAM_demo(nnUNetTrainerSSS_noSAM):
    """The README demo: long enough on a CPU to learn the small synthetic dataset, short enough to wait for."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 8
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 5
