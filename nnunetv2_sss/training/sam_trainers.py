"""Trainers with SAM-2 pseudo-labels: SSS (UniMatch + DFE + SAM-2 via PCSW) and SemiSAM (mean teacher + SAM-2).

Both share ``SAMRefreshMixin``: at the start of training (rank 0) it builds the SAM-2 backend from the local
checkpoint -- before anything heavy, so a missing checkpoint fails in seconds --, encodes every unlabeled slice
once (the embedding cache), writes all-ignore maps so nnU-Net's loader finds a map per case from the first
iteration, and learns PCSW's plausibility limits from the labeled cases. At the end of every K-th epoch after the
warm-up it refreshes the maps from the student's current prediction (``nnunetv2_sss.sam.refresh``); the base
trainer's ``train_step`` already trains both strong views against them with ``sam_loss_weight()``.

SAM-2 never enters the network or the checkpoint's ``network_weights``: stock ``nnUNetv2_predict`` loads these
checkpoints like any other, and this module imports ``sam2`` only inside the backend when training starts.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import distributed as dist

from nnunetv2_sss.sam.pcsw import PCSWConfig, PlausibilityLimits
from nnunetv2_sss.training.semi_supervised import nnUNetTrainerSSS_noSAM, nnUNetTrainerUniMatch
from nnunetv2_sss.training.variants import ShortRun

if TYPE_CHECKING:
    from nnunetv2_sss.sam.backend import SAM2Backend

REFRESH_FOLDER = "sam2_refresh"


def _pcsw_line(counts: dict) -> str:
    """'class 1: 4 prompted, 2 rejected (inconsistent=2); ...' from RefreshSummary.pcsw."""
    acc, rej = counts.get("accepted", {}), counts.get("rejected", {})
    parts = []
    for lab in sorted(set(acc) | set(rej), key=int):
        why = ", ".join(f"{k}={v}" for k, v in sorted(rej.get(lab, {}).items()))
        parts.append(f"class {lab}: {acc.get(lab, 0)} prompted, {sum(rej.get(lab, {}).values())} rejected"
                     + (f" ({why})" if why else ""))
    return "; ".join(parts) if parts else "no foreground predicted"


class SAMRefreshMixin:
    """SAM-2 set-up, periodic pseudo-label refresh and its checkpoint state, for nnUNetTrainerUniMatch subclasses.

    Schedule: refresh at the end of epoch e when e + 1 >= ``sam_warmup_epochs`` and (e + 1 - warm-up) is a multiple
    of ``sam_refresh_every`` (never after the last epoch: nothing would train on it). The SAM loss weight is 0 until
    this run has refreshed once and before the warm-up ends, then ramps linearly to ``lambda_sam`` over
    ``sam_rampup_epochs``. Defaults are this project's choices for 1000-epoch nnU-Net runs, not the papers'.
    """

    use_sam = True
    lambda_sam: float = 0.5
    sam_image_size: int = 1024
    sam_warmup_epochs: int = 100
    sam_refresh_every: int = 50
    sam_rampup_epochs: int = 100
    sam_refresh_max_cases: int | None = None  # None = all unlabeled cases per refresh, else a rotating subset
    sam_disagree_confidence: float = 0.9
    sam_use_mirroring: bool = False  # student TTA during the refresh: 2^axes times slower
    sam_overlay_cases: int = 2
    sam_overlay_slices: int = 2
    sam_cache_batch_size: int = 1
    pcsw_config: PCSWConfig = PCSWConfig()
    pcsw_limit_slack: float = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.sam_backend: SAM2Backend | None = None
        self.pcsw_limits: PlausibilityLimits | None = None
        self.sam_last_refresh_epoch: int | None = None
        self.sam_refresh_count = 0
        self.sam_agreement = math.nan

    # ------------------------------------------------------------------ set-up
    def _check_sam_settings(self) -> None:
        if self.label_manager.has_regions:
            raise ValueError(f"{self.__class__.__name__} needs a label-based dataset: SAM-2 pseudo-labels are one "
                             f"label map per case. Train this dataset with stock nnUNetTrainer, or define it with "
                             f"labels instead of regions.")
        if self.sam_refresh_every < 1 or self.sam_warmup_epochs < 0 or self.sam_rampup_epochs < 0:
            raise ValueError(f"sam_refresh_every must be >= 1 and sam_warmup_epochs, sam_rampup_epochs >= 0 (got "
                             f"{self.sam_refresh_every}, {self.sam_warmup_epochs}, {self.sam_rampup_epochs})")

    def build_sam_backend(self) -> SAM2Backend:
        """The SAM-2 model from ``nnUNet_sss_sam2_checkpoint`` on the trainer's device (raises SAM2CheckpointError)."""
        from nnunetv2_sss.sam.backend import SAM2Backend

        t0 = time.perf_counter()
        backend = SAM2Backend(image_size=self.sam_image_size, device=self.device)
        self.print_to_log_file(f"SAM-2: checkpoint {backend.checkpoint_path} ({backend.config_name}), image size "
                               f"{backend.image_size}, device {backend.device}, loaded in "
                               f"{time.perf_counter() - t0:.1f} s")
        return backend

    def on_train_start(self) -> None:
        self._check_sam_settings()
        if self.local_rank == 0:
            self.sam_backend = self.build_sam_backend()  # first: a bad checkpoint fails before any heavy work
        super().on_train_start()

    def prepare_unlabeled_data(self) -> None:
        """Runs inside get_dataloaders before the unlabeled loader exists: preprocessing, then the SAM-2 cache,
        maps for every case and the PCSW limits (rank 0; the others wait)."""
        super().prepare_unlabeled_data()
        if self.local_rank == 0:
            self.prepare_sam()
        if self.is_ddp:
            dist.barrier()

    def prepare_sam(self) -> None:
        """Cache (built or resumed when missing/stale), initial maps, PCSW limits."""
        from nnunetv2_sss.sam.cache import build_sam2_cache
        from nnunetv2_sss.sam.refresh import init_empty_pseudolabels, learn_limits_from_training_cases

        folder = self.unlabeled_folder
        t0 = time.perf_counter()
        build_sam2_cache(folder, self.sam_backend, self.plans_manager.plans_name, self.configuration_name,
                         data_identifier=self.configuration_manager.data_identifier,
                         batch_size=self.sam_cache_batch_size, progress=True)
        self.print_to_log_file(f"SAM-2 embedding cache ready in {time.perf_counter() - t0:.1f} s")
        # a fresh run starts from all-ignore maps; a resumed one keeps the maps of its last refresh
        written = init_empty_pseudolabels(folder, overwrite=self.sam_last_refresh_epoch is None,
                                          maps_folder=self.sam_maps_folder)
        if written:
            self.print_to_log_file(f"SAM-2 pseudo-labels: {len(written)} all-ignore maps written")
        if self.pcsw_limits is None:
            dataset_tr, _ = self.get_tr_and_val_datasets()
            self.pcsw_limits = learn_limits_from_training_cases(
                dataset_tr, dataset_tr.identifiers, self.label_manager.foreground_labels, self.pcsw_limit_slack)
        self.print_to_log_file(f"PCSW limits (px, slack {self.pcsw_limits.slack}): " + "; ".join(
            f"class {c}: area {v.min_area:.0f}-{v.max_area:.0f}, extent {v.min_extent:.0f}-{v.max_extent:.0f} "
            f"({v.n_slices} slices)" for c, v in sorted(self.pcsw_limits.per_class.items())))

    # ------------------------------------------------------------------ schedule
    def sam_refresh_due(self, epoch: int) -> bool:
        """Refresh at the end of ``epoch``?"""
        done = epoch + 1 - self.sam_warmup_epochs
        return done >= 0 and done % self.sam_refresh_every == 0 and epoch < self.num_epochs - 1

    def sam_loss_weight(self) -> float:
        if self.sam_last_refresh_epoch is None or self.current_epoch < self.sam_warmup_epochs:
            return 0.0
        if self.sam_rampup_epochs <= 0:
            return float(self.lambda_sam)
        ramp = (self.current_epoch - self.sam_warmup_epochs + 1) / self.sam_rampup_epochs
        return float(self.lambda_sam) * min(1.0, ramp)

    def sam_agreement_this_epoch(self) -> float:
        """SAM-student Dice of the latest refresh, i.e. of the maps this epoch trained on."""
        return self.sam_agreement

    def sam_refresh_cases(self) -> list[str]:
        """All unlabeled cases, or the next ``sam_refresh_max_cases`` of them in a fixed rotation."""
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        ids = sorted(infer_dataset_class(self.unlabeled_folder).get_identifiers(self.unlabeled_folder))
        m = self.sam_refresh_max_cases
        if m is None or m >= len(ids):
            return ids
        start = (self.sam_refresh_count * m) % len(ids)
        return [ids[(start + i) % len(ids)] for i in range(m)]

    # ------------------------------------------------------------------ refresh
    def on_epoch_end(self) -> None:
        if self.sam_refresh_due(self.current_epoch):
            self.refresh_sam_pseudolabels()
        super().on_epoch_end()  # checkpoints saved there already hold this refresh

    def refresh_sam_pseudolabels(self) -> None:
        """Rewrite the SAM-2 maps from the student's current prediction (rank 0), overlays in the fold folder."""
        from nnunetv2_sss.sam.refresh import refresh_pseudolabels
        from nnunetv2_sss.training.student_inference import student_predict_fn

        epoch = self.current_epoch
        agreement = math.nan
        if self.local_rank == 0:
            with student_predict_fn(self, self.sam_use_mirroring) as predict:
                summary = refresh_pseudolabels(
                    self.sam_backend, self.unlabeled_folder, self.sam_refresh_cases(), predict,
                    self.label_manager.foreground_labels, self.label_manager.num_segmentation_heads,
                    self.pcsw_limits, self.pcsw_config, self.sam_disagree_confidence,
                    overlay_folder=Path(self.output_folder) / REFRESH_FOLDER / f"epoch_{epoch:04d}",
                    overlay_cases=self.sam_overlay_cases, overlay_slices_per_case=self.sam_overlay_slices,
                    title_prefix=f"epoch {epoch}: ", maps_folder=self.sam_maps_folder)
            self.print_to_log_file(summary.log_line())
            self.print_to_log_file(f"PCSW: {_pcsw_line(summary.pcsw)}")
            agreement = summary.agreement
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if self.is_ddp:
            box = [agreement]
            dist.broadcast_object_list(box, src=0)
            agreement = box[0]
        self.sam_agreement = agreement
        self.sam_last_refresh_epoch = epoch
        self.sam_refresh_count += 1

    def on_train_end(self) -> None:
        super().on_train_end()
        self.sam_backend = None

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        """Plain dicts and numbers only, so stock nnU-Net loads the checkpoint without this package's classes."""
        state = super().extra_checkpoint_state()
        backend = self.sam_backend
        state["sam"] = {
            "pcsw_limits": self.pcsw_limits.to_dict() if self.pcsw_limits is not None else None,
            "last_refresh_epoch": self.sam_last_refresh_epoch,
            "refresh_count": self.sam_refresh_count,
            "agreement": self.sam_agreement,
            "image_size": self.sam_image_size,
            "checkpoint_file": Path(backend.checkpoint_path).name if backend is not None else None,
        }
        return state

    def load_extra_checkpoint_state(self, state: dict) -> None:
        super().load_extra_checkpoint_state(state)
        sam = state.get("sam") or {}
        limits = sam.get("pcsw_limits")
        self.pcsw_limits = PlausibilityLimits.from_dict(limits) if limits else None
        self.sam_last_refresh_epoch = sam.get("last_refresh_epoch")
        self.sam_refresh_count = int(sam.get("refresh_count", 0))
        self.sam_agreement = float(sam.get("agreement", math.nan))


class nnUNetTrainerSSS(SAMRefreshMixin, nnUNetTrainerSSS_noSAM):
    """SSS (Zhu et al. 2025): weak-to-strong consistency + DFE + SAM-2 pseudo-labels prompted by PCSW."""


class nnUNetTrainerSemiSAM(SAMRefreshMixin, nnUNetTrainerUniMatch):
    """SemiSAM (Zhang et al. 2023) in nnU-Net: a mean-teacher student whose SAM-2 masks, prompted from the
    student's own prediction, are extra targets. EMA-teacher pseudo-labels on every pixel, no DFE, no feature
    perturbation, no CutMix."""

    use_ema_teacher = True
    use_dfe = False
    lambda_fp = 0.0
    cutmix_p = 0.0
    confidence_threshold = 0.0


# ---------------------------------------------------------------------- short variants
class _SAMSmoke(ShortRun):
    """A few iterations, a refresh after epoch 0 on 2 cases at SAM size 256: checks the pipeline, learns nothing."""

    short_epochs, short_iterations, short_val_iterations = 2, 3, 2
    sam_image_size = 256
    sam_warmup_epochs = 0
    sam_refresh_every = 1
    sam_rampup_epochs = 0
    sam_refresh_max_cases = 2


class _SAM5Epochs(ShortRun):
    """5 epochs; SAM-2 maps from the end of epoch 1 on, full weight from epoch 3."""

    short_epochs = 5
    sam_warmup_epochs = 2
    sam_refresh_every = 1
    sam_rampup_epochs = 2


class nnUNetTrainerSSS_smoke(_SAMSmoke, nnUNetTrainerSSS):
    pass


class nnUNetTrainerSemiSAM_smoke(_SAMSmoke, nnUNetTrainerSemiSAM):
    pass


class nnUNetTrainerSSS_5epochs(_SAM5Epochs, nnUNetTrainerSSS):
    pass


class nnUNetTrainerSemiSAM_5epochs(_SAM5Epochs, nnUNetTrainerSemiSAM):
    pass
