"""Trainers with SAM-2 pseudo-labels: SSS (UniMatch + DFE + SAM-2 via PCSW) and SemiSAM (mean teacher + SAM-2).

Both share ``SAMRefreshMixin``: at the start of training it resolves the refresh schedule (fractions of
``num_epochs``), prints the refresh epochs and refuses to start when none can happen; then (rank 0) it builds the
SAM-2 backend from the local checkpoint -- before anything heavy, so a missing checkpoint fails in seconds --,
encodes every unlabeled slice once (the embedding cache), writes all-ignore maps so nnU-Net's loader finds a map per
case from the first iteration, and learns PCSW's plausibility limits from the labeled cases. At the end of each
scheduled epoch it refreshes the maps from the student's current prediction (``nnunetv2_sss.sam.refresh``); the
base trainer's ``sam_loss`` hook trains against them with ``sam_loss_weight()``. A resumed run with no refresh
left trains on its last maps and loads neither SAM-2 nor the cache.

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
from nnunetv2_sss.training.sam_schedule import SAMSchedule
from nnunetv2_sss.training.semi_supervised import (
    nnUNetTrainerSSS_noSAM,
)

if TYPE_CHECKING:
    from nnunetv2_sss.sam.backend import SAM2Backend

REFRESH_FOLDER = "sam2_refresh"


class SAMRefreshMixin:
    """SAM-2 set-up, periodic pseudo-label refresh and its checkpoint state, for nnUNetTrainerUniMatch subclasses.

    Schedule as fractions of ``num_epochs`` (``SAMSchedule``), so it fits any training length: warm-up
    ``sam_warmup_fraction``, then a refresh every ``sam_refresh_every_fraction``, never after the last epoch. The SAM
    loss weight is 0 until this run has refreshed once and before the warm-up ends, then ramps linearly to
    ``lambda_sam`` over ``sam_rampup_fraction``. For 1000 epochs the defaults give a warm-up of 100 epochs
    (warm-started; 300 from scratch, counted after the supervised warm-up), a refresh every 50 and a ramp over 100
    (this project's choices, not the papers'). A run whose schedule holds no refresh is refused at start: it would
    be ``nnUNetTrainerSSS_noSAM`` under another name.
    """

    use_sam = True
    lambda_sam: float = 0.5
    sam_image_size: int = 1024
    sam_warmup_fraction: float = 0.1
    sam_refresh_every_fraction: float = 0.05
    sam_rampup_fraction: float = 0.1
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
        self.sam_active = True  # False for a resumed run with no refresh left: no backend, no cache

    # ------------------------------------------------------------------ set-up
    def _check_sam_settings(self) -> None:
        if self.label_manager.has_regions:
            raise ValueError(f"{self.__class__.__name__} needs a label-based dataset: SAM-2 pseudo-labels are one "
                             f"label map per case. Train this dataset with stock nnUNetTrainer, or define it with "
                             f"labels instead of regions.")
        fractions = {"sam_warmup_fraction": self.sam_warmup_fraction,
                     "sam_refresh_every_fraction": self.sam_refresh_every_fraction,
                     "sam_rampup_fraction": self.sam_rampup_fraction}
        bad = {k: v for k, v in fractions.items() if not 0 <= v <= 1}
        if bad:
            raise ValueError(f"{self.__class__.__name__}: the SAM-2 schedule is given as fractions of num_epochs in "
                             f"[0, 1]; got {bad}. Set them in a subclass, e.g. sam_warmup_fraction = 0.1.")

    def sam_schedule(self) -> SAMSchedule:
        """This run's refresh schedule, from ``num_epochs`` as it is now (budget env vars and variants applied); the
        SAM-2 warm-up counts from the end of the supervised warm-up of a run from scratch."""
        warmup = min(1.0, self.sam_warmup_fraction + self.supervised_warmup_fraction())
        return SAMSchedule.from_fractions(self.num_epochs, warmup, self.sam_refresh_every_fraction,
                                          self.sam_rampup_fraction)

    def check_sam_schedule(self) -> None:
        """Print the refresh epochs; refuse a run in which SAM-2 would never be used; switch SAM-2 off (no backend,
        no cache) for a resumed run whose refreshes are all done."""
        schedule = self.sam_schedule()
        self.print_to_log_file(schedule.describe(self.lambda_sam), also_print_to_console=True)
        if not schedule.refresh_epochs:
            raise ValueError(
                f"{self.__class__.__name__}: with num_epochs = {self.num_epochs} no SAM-2 refresh can happen (warm-up "
                f"{schedule.warmup} epochs from sam_warmup_fraction = {self.sam_warmup_fraction}, and none after the "
                f"last epoch), so SAM-2 would never be used and the run would be nnUNetTrainerSSS_noSAM under another "
                f"name. Train more epochs (nnUNet_sss_num_epochs), lower sam_warmup_fraction in a subclass, or use "
                f"nnUNetTrainerSSS_noSAM.")
        remaining = [e for e in schedule.refresh_epochs if e >= self.current_epoch]
        if not remaining and self.sam_last_refresh_epoch is None:
            raise ValueError(
                f"{self.__class__.__name__}: resuming at epoch {self.current_epoch}, after every scheduled SAM-2 "
                f"refresh {list(schedule.refresh_epochs)}, but this run has no refresh in its checkpoint: SAM-2 "
                f"would never be used. Start a new run, or continue it with nnUNetTrainerSSS_noSAM.")
        self.sam_active = bool(remaining)
        if not remaining:
            self.print_to_log_file(f"SAM-2: every scheduled refresh is done (last at epoch "
                                   f"{self.sam_last_refresh_epoch}); training on its maps, SAM-2 and its cache are "
                                   f"not loaded", also_print_to_console=True)

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
        self.check_sam_schedule()  # before anything heavy: a run without refreshes is refused, not run
        if self.local_rank == 0 and self.sam_active:
            from nnunetv2_sss.sam.backend import SAM2CheckpointError

            try:
                self.sam_backend = self.build_sam_backend()  # first: a bad checkpoint fails before any heavy work
            except SAM2CheckpointError:
                self._discard_log_of_unstarted_run()
                raise
        super().on_train_start()

    def _discard_log_of_unstarted_run(self) -> None:
        """A run refused for its SAM-2 checkpoint never started: remove the log nnU-Net's __init__ opened for it
        (and the fold folder when that leaves it empty), so retries do not pile up logs of runs that never were.
        A resumed run (checkpoints present) keeps everything."""
        fold = Path(self.output_folder)
        if self.current_epoch != 0 or any(fold.glob("checkpoint_*.pth")):
            return
        log = Path(self.log_file) if self.log_file else None
        if log is not None and log.is_file():
            log.unlink()
        if fold.is_dir() and not any(fold.iterdir()):
            fold.rmdir()

    def prepare_unlabeled_data(self) -> None:
        """Runs inside get_dataloaders before the unlabeled loader exists: preprocessing, then the SAM-2 cache,
        maps for every case and the PCSW limits (rank 0; the others wait)."""
        super().prepare_unlabeled_data()
        if self.local_rank == 0:
            if self.sam_active:
                self.prepare_sam()
            else:  # resumed after the last refresh: the run's maps must exist, nothing else is needed
                from nnunetv2_sss.sam.refresh import init_empty_pseudolabels

                init_empty_pseudolabels(self.unlabeled_folder, overwrite=False, maps_folder=self.sam_maps_folder)
        if self.is_ddp:
            dist.barrier()

    def prepare_sam(self) -> None:
        """Cache (built or resumed when missing/stale), initial maps, PCSW limits."""
        from nnunetv2_sss.sam.cache import build_sam2_cache
        from nnunetv2_sss.sam.refresh import init_empty_pseudolabels, learn_limits_from_training_cases

        folder = self.unlabeled_folder
        t0 = time.perf_counter()
        cache = build_sam2_cache(folder, self.sam_backend, batch_size=self.sam_cache_batch_size, progress=True)
        self.print_to_log_file(f"SAM-2 embedding cache {cache} ready in {time.perf_counter() - t0:.1f} s")
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
        """Refresh at the end of ``epoch``? Exactly the epochs ``check_sam_schedule`` printed."""
        return self.sam_active and epoch in self.sam_schedule().refresh_epochs

    def sam_loss_weight(self) -> float:
        schedule = self.sam_schedule()
        if self.sam_last_refresh_epoch is None or self.current_epoch < schedule.warmup:
            return 0.0
        if schedule.rampup <= 0:
            return float(self.lambda_sam)
        ramp = (self.current_epoch - schedule.warmup + 1) / schedule.rampup
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
        from nnunetv2_sss.sam.refresh import pcsw_counts_line, refresh_pseudolabels
        from nnunetv2_sss.training.student_inference import student_predict_fn

        epoch = self.current_epoch
        agreement = math.nan
        if self.local_rank == 0:
            self.ensure_sam_cache()
            with student_predict_fn(self, self.sam_use_mirroring) as predict:
                summary = refresh_pseudolabels(
                    self.sam_backend, self.unlabeled_folder, self.sam_refresh_cases(), predict,
                    self.label_manager.foreground_labels, self.label_manager.num_segmentation_heads,
                    self.pcsw_limits, self.pcsw_config, self.sam_disagree_confidence,
                    overlay_folder=Path(self.output_folder) / REFRESH_FOLDER / f"epoch_{epoch:04d}",
                    overlay_cases=self.sam_overlay_cases, overlay_slices_per_case=self.sam_overlay_slices,
                    title_prefix=f"epoch {epoch}: ", maps_folder=self.sam_maps_folder)
            self.print_to_log_file(summary.log_line())
            self.print_to_log_file(f"PCSW: {pcsw_counts_line(summary.pcsw)}")
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

    def ensure_sam_cache(self) -> None:
        """Before a refresh: if another run on this data replaced the shared cache with features of a different
        SAM-2 model or size, rebuild it for ours (under the cache lock) instead of decoding foreign features."""
        from nnunetv2_sss.sam.cache import build_sam2_cache, make_cache_key, read_cache_key
        from nnunetv2_sss.unlabeled.layout import sam2_cache_folder

        if read_cache_key(sam2_cache_folder(self.unlabeled_folder)) != make_cache_key(self.sam_backend):
            self.print_to_log_file("SAM-2 cache was replaced by a run with another SAM-2 model or size: rebuilding it",
                                   also_print_to_console=True)
            build_sam2_cache(self.unlabeled_folder, self.sam_backend, batch_size=self.sam_cache_batch_size)

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
