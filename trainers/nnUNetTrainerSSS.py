"""Shim for nnUNet_extTrainer: re-exports the SAM-2 trainers (SSS, SemiSAM). sam2 is imported only at train start."""

from nnunetv2_sss.training.sam_trainers import (
    nnUNetTrainerSemiSAM,
    nnUNetTrainerSemiSAM_5epochs,
    nnUNetTrainerSemiSAM_smoke,
    nnUNetTrainerSSS,
    nnUNetTrainerSSS_5epochs,
    nnUNetTrainerSSS_smoke,
)
