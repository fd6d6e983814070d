"""Short variants in nnU-Net's style (cf. nnUNetTrainer_5epochs): they only set attributes."""

from __future__ import annotations

import torch

from nnunetv2_sss.training.semi_supervised import nnUNetTrainerSSS_noSAM, nnUNetTrainerUniMatch


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
