"""Shim for nnUNet_extTrainer: re-exports the semi-supervised trainers (no SAM-2 needed)."""

from nnunetv2_sss.cli import install_user_error_hook
from nnunetv2_sss.training.semi_supervised import (
    nnUNetTrainerSSS_noSAM,
    nnUNetTrainerSSS_noSAM_EMA,
    nnUNetTrainerUniMatch,
    nnUNetTrainerUniMatch_EMA,
)
from nnunetv2_sss.training.variants import (
    nnUNetTrainerSSS_noSAM_5epochs,
    nnUNetTrainerSSS_noSAM_demo,
    nnUNetTrainerSSS_noSAM_smoke,
    nnUNetTrainerUniMatch_5epochs,
)

# nnU-Net imports this shim when it looks the trainer up: from here on our input errors end as one message
install_user_error_hook()
