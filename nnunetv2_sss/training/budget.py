"""The supervised baseline of every benchmark: stock nnUNetTrainer plus this package's run settings, nothing else.

It imports nothing of the semi-supervised stack: what it trains is what nnU-Net trains.
"""

from __future__ import annotations

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_sss.training.run_settings import RunSettingsMixin


class nnUNetTrainer_budget(RunSettingsMixin, nnUNetTrainer):
    """Stock supervised nnUNetTrainer that honours the same run settings as the SSS trainers (training length from
    nnUNet_sss_num_epochs / _iterations_per_epoch / _val_iterations_per_epoch, nnUNet_sss_seed, snapshots): the
    supervised baseline of a benchmark at an equal iteration budget and seed. Nothing else differs."""
