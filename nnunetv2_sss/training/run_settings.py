"""Run settings that nnU-Net lacks and benchmarks need: seeds, a fixed iteration budget, learning-curve snapshots.

Seeds: nnU-Net has none, and a comparison of methods needs repeats that differ only by seed. ``RunSettingsMixin``
seeds Python's ``random``, numpy and torch when the trainer is created and when the network is built (so the
initial weights follow the seed) and again before the data loaders are built, and gives every data-augmentation
worker its own seed derived from it (nnU-Net starts its workers with ``seeds=None``, i.e. from OS entropy). The
seed comes from the env var ``nnUNet_sss_seed`` or the class attribute ``seed``; None keeps nnU-Net's behaviour.

What stays nondeterministic even with a seed: with ``nnUNet_n_proc_DA`` > 0, nnU-Net's
``NonDetMultiThreadedAugmenter`` hands out batches in the order its workers finish, so which worker's batch comes
first varies (each worker's own stream is seeded); on CUDA, cuDNN autotuning and atomic-add kernels; torch.compile.
With ``nnUNet_n_proc_DA=0`` on the CPU two runs with the same seed are identical.

Budget: ``nnUNet_sss_num_epochs``, ``nnUNet_sss_iterations_per_epoch``, ``nnUNet_sss_val_iterations_per_epoch`` set
the training length, so a benchmark gives every trainer the same iteration budget.

Warm start (``training/warm_start.py``): ``nnUNet_sss_init_checkpoint`` (or the attribute ``init_checkpoint``) starts
the run from a supervised checkpoint of the same dataset, with ``warm_start_initial_lr`` (env
``nnUNet_sss_warm_start_lr``) and ``warm_start_num_epochs`` (the budget env vars win over it).

Snapshots: ``nnUNet_sss_snapshot_every`` = K (or the attribute ``snapshot_every``) keeps a copy of the checkpoint
every K epochs as ``checkpoint_epochNNNN.pth`` (NNNN = epochs trained), so a learning curve can be read off one
run (Dice of each snapshot on a test set) and the pseudo-labels can be measured over training; nnU-Net's
``checkpoint_latest.pth`` is then written as often, so ``--c`` resumes an interrupted run from its last snapshot.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter

from nnunetv2_sss.training.warm_start import init_checkpoint_path, warm_start

SEED_ENV = "nnUNet_sss_seed"


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reseeded_augmenter(augmenter, seed: int):
    """The same nnU-Net augmenter, restarted with one seed per worker (single-process augmenters are returned as
    they are: they run in the seeded main process)."""
    if not isinstance(augmenter, NonDetMultiThreadedAugmenter):
        return augmenter
    augmenter._finish()
    return NonDetMultiThreadedAugmenter(
        data_loader=augmenter.generator, transform=augmenter.transform, num_processes=augmenter.num_processes,
        num_cached=augmenter.num_cached, seeds=[seed + i for i in range(augmenter.num_processes)],
        pin_memory=augmenter.pin_memory, wait_time=augmenter.wait_time)


def _number_env(name: str, kind: type[int] | type[float]) -> int | float | None:
    """The env var ``name`` parsed as ``kind``; None when unset or empty."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"environment variable {name} must be {what}, got {value!r}") from None


def _int_env(name: str) -> int | None:
    return _number_env(name, int)  # type: ignore[return-value]


def float_env(name: str) -> float | None:
    return _number_env(name, float)


def bool_env(name: str) -> bool | None:
    """The env var ``name`` as a switch, ``1`` or ``0``; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"environment variable {name} must be 1 (on) or 0 (off), got {value!r}")
    return value == "1"


def apply_budget_from_env(trainer) -> None:
    """Training length from env vars, so a benchmark gives every trainer the same iteration budget."""
    for var, attr in (("nnUNet_sss_num_epochs", "num_epochs"),
                      ("nnUNet_sss_iterations_per_epoch", "num_iterations_per_epoch"),
                      ("nnUNet_sss_val_iterations_per_epoch", "num_val_iterations_per_epoch")):
        value = _int_env(var)
        if value is not None:
            setattr(trainer, attr, value)


class RunSettingsMixin:
    """Mixin for nnUNetTrainer subclasses: seed, iteration budget and snapshots from env vars or attributes."""

    seed: int | None = None
    snapshot_every: int = 0  # epochs; 0 = no snapshots
    init_checkpoint: str | None = None  # warm start (nnUNet_sss_init_checkpoint wins)
    # the semi-supervised stage restarts nnU-Net's poly schedule at nnU-Net's own 0.01: chosen on the Hippocampus
    # validation cases (seed 0, B = 2000, S = 500: val mean Dice 0.782 at 0.01, 0.762 at 1e-3; README); a quarter
    # of nnU-Net's length
    warm_start_initial_lr: float = 1e-2
    warm_start_num_epochs: int = 250

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        env_seed = _int_env(SEED_ENV)
        if env_seed is not None:
            self.seed = env_seed
        if self.seed is not None:
            seed_everything(self.seed)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.init_checkpoint_file = init_checkpoint_path(self.init_checkpoint)
        if self.init_checkpoint_file is not None:
            self.num_epochs = self.warm_start_num_epochs
            lr = float_env("nnUNet_sss_warm_start_lr")
            if lr is not None:
                self.warm_start_initial_lr = lr
        apply_budget_from_env(self)
        every = _int_env("nnUNet_sss_snapshot_every")
        if every is not None:
            self.snapshot_every = every
        if self.snapshot_every > 0:
            # resumable inside a run: checkpoint_latest.pth (what --c loads) as often as the snapshots
            self.save_every = min(self.save_every, self.snapshot_every)
        if self.seed is not None:
            self.print_to_log_file(f"seed {self.seed} ({SEED_ENV} or the trainer's 'seed' attribute)")

    def on_epoch_end(self) -> None:
        done = self.current_epoch + 1  # nnU-Net increments current_epoch inside on_epoch_end
        if self.snapshot_every > 0 and done % self.snapshot_every == 0 and done < self.num_epochs:
            self.save_checkpoint(os.path.join(self.output_folder, f"checkpoint_epoch{done:04d}.pth"))
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net predicts the fold's validation cases after training; with fold ``all`` that is every training case
        (minutes for 160 cases on a CPU) and tells a benchmark nothing it uses: ``nnUNet_sss_skip_final_validation=1``
        skips it (benchmarks predict their own held-out cases)."""
        if os.environ.get("nnUNet_sss_skip_final_validation", "0") == "1":
            self.print_to_log_file("final validation skipped (nnUNet_sss_skip_final_validation=1)")
            return
        super().perform_actual_validation(save_probabilities)

    def worker_seed(self, stream: int) -> int:
        """A distinct seed per loader stream (0 train, 1 val, 2 unlabeled) and DDP rank."""
        return (self.seed or 0) * 10_000 + getattr(self, "local_rank", 0) * 1_000 + stream * 100

    def initialize(self) -> None:
        if self.seed is not None:  # the network's initial weights follow the seed, not what ran before
            seed_everything(self.seed + getattr(self, "local_rank", 0))
        if self.init_checkpoint_file is not None:
            self.initial_lr = self.warm_start_initial_lr  # before nnU-Net builds the optimizer and its schedule
        super().initialize()
        if self.init_checkpoint_file is not None:  # before subclasses build a teacher or DFE from the network
            warm_start(self, self.init_checkpoint_file)

    @property
    def warm_started(self) -> bool:
        return self.init_checkpoint_file is not None

    def get_dataloaders(self):
        if self.seed is None:
            return super().get_dataloaders()
        seed_everything(self.worker_seed(9))
        dl_tr, dl_val = super().get_dataloaders()
        return reseeded_augmenter(dl_tr, self.worker_seed(0)), reseeded_augmenter(dl_val, self.worker_seed(1))
