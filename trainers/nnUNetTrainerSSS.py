"""Shim for nnUNet_extTrainer: re-exports the SAM-2 trainers (SSS, SemiSAM). sam2 is imported only at train start."""

from nnunetv2_sss.cli import install_user_error_hook
from nnunetv2_sss.training.sam_trainers import nnUNetTrainerSSS
from nnunetv2_sss.training.semisam import nnUNetTrainerSemiSAM
from nnunetv2_sss.training.variants import (
    nnUNetTrainerSemiSAM_5epochs,
    nnUNetTrainerSemiSAM_smoke,
    nnUNetTrainerSSS_5epochs,
    nnUNetTrainerSSS_smoke,
)

# nnU-Net imports this shim when it looks the trainer up: from here on our input errors end as one message
install_user_error_hook()
