"""Semi-supervised nnU-Net trainers: UniMatch-style weak-to-strong consistency, DFE, EMA teacher, SAM-2 term.

Each iteration draws nnU-Net's labeled batch (its loss and augmentation unchanged) and an unlabeled batch whose
patches come as [weak, strong1, strong2] (``training/unlabeled_stream.py``). The labeled and weak patches share one
encoder pass (as UniMatch does); the weak prediction (or the EMA teacher's) gives confident pseudo-labels; the
strong views (CutMix'ed between unlabeled samples, pseudo-labels mixed the same way), a feature-perturbation stream
and, optionally, the DFE stream are trained against them (the hooks of ``training/weak_to_strong.py``). One
backward, one optimizer step. The network stays a stock nnU-Net network: DFE, the teacher and SAM-2 live outside
it (``training/semi_state.py``), so ``nnUNetv2_predict`` loads the checkpoint like any other.

A run warm-started from a supervised model (``training/warm_start.py``) is semi-supervised from its first step; a
run from scratch first trains supervised only (``unsup_warmup_fraction``), then ramps the unsupervised terms in.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist

from nnunetv2_sss.consistency.losses import ClassAdaptiveThreshold, MaskedCEDiceLoss, sigmoid_rampup
from nnunetv2_sss.training.checkpoints import CompleteCheckpointMixin, backward_and_step
from nnunetv2_sss.training.progress import (
    FRACTION_KEYS,
    LOSS_KEYS,
    SemiSupervisedLogging,
    SSSLocalLogger,
    class_fraction_keys,
)
from nnunetv2_sss.training.run_settings import RunSettingsMixin, bool_env, float_env
from nnunetv2_sss.training.semi_state import SemiSupervisedState
from nnunetv2_sss.training.unlabeled_stream import (
    UnlabeledBatch,
    close_loader,
    draw_unlabeled_batch,
    make_unlabeled_loader,
    split_batch_across_ranks,
)
from nnunetv2_sss.training.warm_start import unwrap_network
from nnunetv2_sss.training.weak_to_strong import PseudoLabels, WeakToStrongHooks
from nnunetv2_sss.unlabeled.layout import SAM_PSEUDOLABEL_FOLDER, unlabeled_preprocessed_folder
from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled


class nnUNetTrainerUniMatch(WeakToStrongHooks, SemiSupervisedLogging, CompleteCheckpointMixin, RunSettingsMixin,
                            nnUNetTrainer):
    """Weak-to-strong consistency (UniMatch) on unlabeled images inside nnU-Net; no DFE, no SAM-2.

    Loss = nnU-Net's own supervised loss, unscaled (CE + Dice with deep supervision, exactly as a stock run), plus
    ramp(t) * (lambda_s1 * L_s1 + lambda_s2 * L_s2 + lambda_fp * L_fp [+ lambda_dfe * L_dfe]) [+ SAM term], each L
    the masked CE + Dice of ``MaskedCEDiceLoss`` (nnU-Net's loss form). UniMatch's medical code uses the same
    relative weights 0.25 / 0.25 / 0.5 but halves its supervised term ((CE + Dice) / 2); we keep nnU-Net's whole,
    so relative to supervision our unsupervised terms weigh half of UniMatch's.
    """

    # unlabeled batch = round(labeled batch * ratio) (at least 2), as UniMatch (equal labeled/unlabeled batches)
    unlabeled_batch_ratio: float = 1.0
    # CutMix partners: "batch" = a random other sample of the same unlabeled batch (no extra forward); "draw" = a
    # separate unlabeled batch as UniMatch does (one more loader draw and a no-grad forward for its pseudo-labels)
    mix_partners: str = "batch"
    confidence_threshold: float = 0.95
    class_adaptive_threshold: bool = False  # per-class thresholds scaled by each class's confidence (see losses.py)
    # pseudo-labels from the weak prediction averaged over nnU-Net's inference mirror axes (every combination, as
    # its test-time mirroring): one more no-grad forward of the unlabeled batch per combination (3 in 2D, 7 in 3D).
    # On by default since round 5 (README): chosen on Hippocampus validation, then above the single prediction on
    # every test seed of Hippocampus and ACDC, for 1.07x the cost per 2D iteration; env
    # nnUNet_sss_pseudo_label_mirroring=0 turns it off
    pseudo_label_mirroring: bool = True
    # threshold of the pixels pseudo-labelled background (None: confidence_threshold); env
    # nnUNet_sss_background_threshold. A stricter one drops more of the structure pixels confidently called
    # background, the pseudo-label error that remains after the warm start (README, benchmarks)
    background_threshold: float | None = None
    lambda_s1: float = 0.25
    lambda_s2: float = 0.25
    lambda_fp: float = 0.5
    lambda_dfe: float = 0.0
    # multiplies every unsupervised weight above (not SAM's); env nnUNet_sss_unsup_weight. 2.0 restores UniMatch's
    # ratio of unsupervised to supervised loss (UniMatch halves its supervised loss, we keep nnU-Net's whole)
    unsup_weight: float = 1.0
    # A run from scratch (no warm start) trains supervised only for this share of its iterations (no unlabeled batch
    # drawn, nnU-Net's own step), then ramps the unsupervised weights in (sigmoid) over ``unsup_rampup_fraction`` of
    # the run: before the student has learnt the labeled cases its confident pixels are background, and the
    # unsupervised terms would teach exactly that. A warm-started run (training/warm_start.py) has no warm-up.
    unsup_warmup_fraction: float = 0.2
    unsup_rampup_fraction: float = 0.05
    unsup_dice_do_bg: bool = True
    feature_dropout_p: float = 0.5
    cutmix_p: float = 0.5
    use_dfe: bool = False
    dfe_num_scales: int | None = None  # None = every encoder scale
    use_ema_teacher: bool = False
    ema_max_momentum: float = 0.996
    use_sam: bool = False
    lambda_sam: float = 0.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.class_fraction_keys = class_fraction_keys(len(self.label_manager.all_labels))
        self.logger.local_logger = SSSLocalLogger(LOSS_KEYS, FRACTION_KEYS + self.class_fraction_keys)
        self.dataloader_unlabeled = None
        self.semi_state = SemiSupervisedState()
        self.unlabeled_loss = MaskedCEDiceLoss(do_bg=self.unsup_dice_do_bg)
        self.encoder_fn: nn.Module | None = None
        self.decoder_fn: nn.Module | None = None
        for attr in ("unsup_warmup_fraction", "background_threshold", "unsup_weight"):  # env nnUNet_sss_<attr> wins
            value = float_env(f"nnUNet_sss_{attr}")
            if value is not None:
                setattr(self, attr, value)
        mirroring = bool_env("nnUNet_sss_pseudo_label_mirroring")
        if mirroring is not None:
            self.pseudo_label_mirroring = mirroring

    # the semi-supervised state, by the names the hooks, tests and subclasses use
    dfe = property(lambda self: self.semi_state.dfe)
    ema_teacher = property(lambda self: self.semi_state.ema_teacher)
    adaptive_threshold = property(lambda self: self.semi_state.adaptive_threshold)
    sss_step = property(lambda self: self.semi_state.step, lambda self, v: setattr(self.semi_state, "step", v))

    # ------------------------------------------------------------------ setup
    def initialize(self) -> None:
        if self.label_manager.has_regions:
            raise ValueError(f"{self.__class__.__name__} needs a label-based dataset: its pseudo-labels are softmax "
                             f"arg-max maps, which do not fit region-based (sigmoid, overlapping) training. Train "
                             f"this dataset with stock nnUNetTrainer, or define it with labels instead of regions.")
        if self.mix_partners not in ("batch", "draw"):
            raise ValueError(f"mix_partners must be 'batch' or 'draw', got {self.mix_partners!r}")
        for name in ("confidence_threshold", "background_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                source = "env nnUNet_sss_background_threshold or " if name == "background_threshold" else ""
                raise ValueError(f"{name} must be a softmax confidence in [0, 1], got {value} ({source}the "
                                 f"trainer's attribute): set it to a value such as 0.95")
        if not (math.isfinite(self.unsup_weight) and self.unsup_weight >= 0):
            raise ValueError(f"unsup_weight must be a finite number >= 0, got {self.unsup_weight} (env "
                             f"nnUNet_sss_unsup_weight or the trainer's attribute): 1.0 is the default")
        super().initialize()  # network, optimizer, and the warm start's weights (RunSettingsMixin)
        net = unwrap_network(self.network)
        adaptive = ClassAdaptiveThreshold(len(self.label_manager.all_labels), self.confidence_threshold) \
            if self.class_adaptive_threshold else None
        self.semi_state = SemiSupervisedState.build(net, self.device, self.use_dfe, self.dfe_num_scales,
                                                    self.use_ema_teacher, self.ema_max_momentum, adaptive, self.is_ddp)
        if self.dfe is not None:
            self.optimizer.add_param_group({"params": list(self.dfe.parameters())})
        # train_step calls encoder and decoder separately (feature perturbation, DFE); compile them separately where
        # nnU-Net compiles the network, instead of bypassing torch.compile
        compile_parts = self._do_i_compile()
        self.encoder_fn = torch.compile(net.encoder) if compile_parts else net.encoder
        self.decoder_fn = torch.compile(net.decoder) if compile_parts else net.decoder
        global_bs = max(2, round(self.configuration_manager.batch_size * self.unlabeled_batch_ratio))
        self.unlabeled_batch_size = split_batch_across_ranks(global_bs, dist.get_world_size(), dist.get_rank()) \
            if self.is_ddp else global_bs
        tau_bg = "the same" if self.background_threshold is None else self.background_threshold
        self.print_to_log_file(
            f"pseudo-labels: confidence threshold {self.confidence_threshold}, background {tau_bg}"
            f"{', from mirror-averaged weak predictions' if self.pseudo_label_mirroring else ''}; unsupervised "
            f"weights s1 {self.lambda_s1}, s2 {self.lambda_s2}, fp {self.lambda_fp}, "
            f"dfe {self.lambda_dfe if self.use_dfe else 0} x {self.unsup_weight}; unlabeled batch "
            f"{self.unlabeled_batch_size}")

    @property
    def unlabeled_folder(self) -> str:
        return str(unlabeled_preprocessed_folder(self.preprocessed_dataset_folder_base,
                                                 self.configuration_manager.data_identifier))

    @property
    def sam_maps_folder(self) -> Path:
        """This run's SAM-2 pseudo-label maps (in the fold folder: folds and trainers never share them, so one
        fold's maps, made by a student that saw another fold's validation cases, cannot leak into it)."""
        return Path(self.output_folder) / SAM_PSEUDOLABEL_FOLDER

    def prepare_unlabeled_data(self) -> None:
        """Preprocess the unlabeled images when missing or stale (rank 0), with a progress bar."""
        if self.local_rank == 0:
            preprocess_unlabeled(self.plans_manager.dataset_name, self.configuration_name,
                                 self.plans_manager.plans_name, num_processes=default_num_processes)
        if self.is_ddp:
            dist.barrier()

    def get_dataloaders(self):
        self.prepare_unlabeled_data()
        dl_tr, dl_val = super().get_dataloaders()
        rotation, do_dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.dataloader_unlabeled = make_unlabeled_loader(
            self.unlabeled_folder, str(self.sam_maps_folder) if self.use_sam else None, self.unlabeled_batch_size,
            self.configuration_manager.patch_size, self.label_manager, initial_patch_size, rotation, mirror_axes,
            do_dummy_2d, None if self.seed is None else self.worker_seed(2), self.device.type == "cuda")
        return dl_tr, dl_val

    def on_train_end(self) -> None:
        super().on_train_end()
        close_loader(self.dataloader_unlabeled)
        self.dataloader_unlabeled = None

    # ------------------------------------------------------------------ schedule
    def supervised_warmup_fraction(self) -> float:
        """Share of the run trained supervised only: ``unsup_warmup_fraction`` from scratch, 0 when warm-started."""
        if getattr(self, "init_checkpoint_file", None) is not None:
            return 0.0
        return min(1.0, max(0.0, self.unsup_warmup_fraction))

    def supervised_warmup_steps(self) -> int:
        """Iterations trained supervised only at the start of the run (no unlabeled batch drawn)."""
        return round(self.num_epochs * self.num_iterations_per_epoch * self.supervised_warmup_fraction())

    def unsupervised_rampup(self) -> float:
        """Sigmoid ramp of the unsupervised weights over ``unsup_rampup_fraction`` of the run, from the end of the
        supervised warm-up (1 when the fraction is 0)."""
        if self.unsup_rampup_fraction <= 0:
            return 1.0
        total = self.num_epochs * self.num_iterations_per_epoch * self.unsup_rampup_fraction
        return sigmoid_rampup((self.sss_step - self.supervised_warmup_steps()) / max(1.0, total))

    def sam_loss_weight(self) -> float:
        """Weight of the SAM-2 term this epoch (subclasses ramp it); 0 disables it."""
        return 0.0

    def unsupervised_weights(self) -> dict[str, float]:
        """This step's weight of each unsupervised term (0 skips the term's computation)."""
        r = self.unsupervised_rampup() * self.unsup_weight
        return {"s1": r * self.lambda_s1, "s2": r * self.lambda_s2, "fp": r * self.lambda_fp,
                "dfe": r * self.lambda_dfe if self.dfe is not None else 0.0,
                "sam": self.sam_loss_weight() if self.use_sam else 0.0}

    # ------------------------------------------------------------------ the step
    def sample_unlabeled(self) -> UnlabeledBatch:
        return draw_unlabeled_batch(self.dataloader_unlabeled, self.device, self.use_sam, self.mix_partners,
                                    self.cutmix_p)

    def supervised_warmup_step(self, batch: dict) -> dict:
        """nnU-Net's own step (its forward, loss, gradient and clipping); no unlabeled batch is drawn."""
        result = nnUNetTrainer.train_step(self, batch)
        self.sss_step += 1
        loss = float(np.asarray(result["loss"]))
        for k in self.logged_step_keys():
            result[k] = np.array(loss if k == "sss_loss_sup" else np.nan, dtype=np.float64)
        return result

    def train_step(self, batch: dict) -> dict:
        warmup = self.supervised_warmup_steps()
        if self.sss_step < warmup:
            return self.supervised_warmup_step(batch)
        if self.ema_teacher is not None and warmup > 0 and self.sss_step == warmup:
            self.ema_teacher.update(unwrap_network(self.network), 0)  # the teacher starts as the warmed-up student
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        u = self.sample_unlabeled()
        weights = self.unsupervised_weights()
        logs: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out_l, weak = self.forward_labeled_and_weak(data, u)
            l_sup = self.supervised_loss(out_l, target)
            pl = self.make_pseudo_labels(u, weak)
            strong_terms, strong = self.strong_view_losses(u, weak, pl)
            terms: dict[str, torch.Tensor | None] = dict(strong_terms)
            terms["fp"] = self.feature_perturbation_loss(u, weak, pl) if weights["fp"] > 0 else None
            terms["dfe"] = None
            if self.dfe is not None and weights["dfe"] > 0:
                terms["dfe"], logs["sss_dfe_similarity"] = self.dfe_loss(u, weak, strong, pl)
            terms["sam"] = self.sam_loss(u, strong) if weights["sam"] > 0 else None
            loss = l_sup
            for k, t in terms.items():
                if t is not None:
                    loss = loss + weights[k] * t
        self.optimizer_step(loss)
        if self.ema_teacher is not None:  # step 0 has momentum 0: the teacher starts as the (pretrained) student
            self.ema_teacher.update(unwrap_network(self.network), self.sss_step - warmup)
        self.sss_step += 1

        logs.update({"sss_loss_sup": l_sup.item(), **self.step_logs(u, pl)})
        logs.update({f"sss_loss_{k}": t.item() for k, t in terms.items() if t is not None})
        result = {"loss": loss.detach().cpu().numpy()}
        for k in self.logged_step_keys():
            result[k] = np.array(logs.get(k, np.nan), dtype=np.float64)
        return result

    def step_logs(self, u: UnlabeledBatch, pl: PseudoLabels) -> dict[str, float]:
        """Confident fraction overall and per class (share of each class's pseudo-labelled pixels kept)."""
        logs = {"sss_confident_fraction": (pl.mask.sum() / u.valid.sum().clamp(min=1)).item()}
        for c, key in enumerate(self.class_fraction_keys):
            of_class = (pl.labels == c).float() * u.valid
            n = of_class.sum()
            logs[key] = (pl.mask * of_class).sum().item() / n.item() if n > 0 else math.nan
        return logs

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, cross-rank gradient average (our forwards bypass DDP's hooks), clip at 12 as nnU-Net, step."""
        params = list(self.network.parameters()) + (list(self.dfe.parameters()) if self.dfe is not None else [])
        backward_and_step(loss, params, self.optimizer, self.grad_scaler, self.is_ddp)


class nnUNetTrainerSSS_noSAM(nnUNetTrainerUniMatch):
    """SSS without SAM-2: weak-to-strong consistency plus Discriminative Feature Enhancement (DFE)."""

    use_dfe = True
    lambda_dfe = 0.25


class nnUNetTrainerUniMatch_EMA(nnUNetTrainerUniMatch):
    """UniMatch with pseudo-labels from an EMA teacher (UniMatch V2 style)."""

    use_ema_teacher = True


class nnUNetTrainerSSS_noSAM_EMA(nnUNetTrainerSSS_noSAM):
    use_ema_teacher = True
