"""Shim for nnUNet_extTrainer: the supervised baseline (stock nnUNetTrainer plus seeds, budget and warm start)."""

from nnunetv2_sss.cli import install_user_error_hook
from nnunetv2_sss.training.budget import nnUNetTrainer_budget

# nnU-Net imports this shim when it looks the trainer up: from here on our input errors end as one message
install_user_error_hook()
