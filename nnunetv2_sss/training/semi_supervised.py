"""Semi-supervised nnU-Net trainers: UniMatch-style weak-to-strong consistency, DFE, EMA teacher, SAM-2 term.

Each iteration draws nnU-Net's labeled batch (its loss and augmentation unchanged) and an unlabeled batch whose
patches come as [weak, strong1, strong2] (see ``nnunetv2_sss.augment.views``). The labeled and weak patches share
one encoder pass (as UniMatch does); the weak prediction (or the EMA teacher's) gives confident pseudo-labels;
the strong views (CutMix'ed between unlabeled samples, pseudo-labels mixed the same way), a feature-perturbation
stream (channel dropout on the weak encoder features) and, optionally, the DFE stream are trained against them.
One backward, one optimizer step. The network itself stays a stock nnU-Net network: DFE, the teacher and SAM-2
live outside it, so ``nnUNetv2_predict`` loads the checkpoint like any other.

``train_step`` is a sequence of hooks, so a variant overrides one piece as nnU-Net's own variants do:
``sample_unlabeled`` (views, mix partners, CutMix boxes) -> ``forward_labeled_and_weak`` -> ``supervised_loss`` ->
``make_pseudo_labels`` -> ``strong_view_losses`` -> ``feature_perturbation_loss`` -> ``dfe_loss`` -> ``sam_loss``
-> ``unsupervised_weights`` (ramp-up) -> ``optimizer_step``. The hooks share one ``UnlabeledStep``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.configuration import default_num_processes
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist

from nnunetv2_sss.augment.views import NUM_VIEWS, apply_cutmix, cutmix_masks, get_unlabeled_transforms
from nnunetv2_sss.consistency.dfe import DFE
from nnunetv2_sss.consistency.ema import EMATeacher
from nnunetv2_sss.consistency.losses import (
    ClassAdaptiveThreshold,
    MaskedCEDiceLoss,
    deep_supervision_targets,
    pseudo_label,
    resize_like,
    sigmoid_rampup,
)
from nnunetv2_sss.training.checkpoints import (
    SSS_STATE_KEY,
    CheckpointError,
    resolve_resume_checkpoint,
    save_complete_checkpoint,
)
from nnunetv2_sss.training.progress import SSSLocalLogger
from nnunetv2_sss.training.run_settings import RunSettingsMixin, float_env
from nnunetv2_sss.training.warm_start import unwrap_network
from nnunetv2_sss.unlabeled.layout import SAM_PSEUDOLABEL_FOLDER
from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled

LOSS_KEYS = ("sss_loss_sup", "sss_loss_s1", "sss_loss_s2", "sss_loss_fp", "sss_loss_dfe", "sss_loss_sam")
FRACTION_KEYS = ("sss_confident_fraction", "sss_dfe_similarity", "sss_sam_agreement")
UNSUPERVISED_TERMS = ("s1", "s2", "fp", "dfe", "sam")


def class_fraction_keys(num_classes: int) -> tuple[str, ...]:
    """One confident-fraction key per class (background included): the share of the pixels pseudo-labelled as that
    class whose confidence reaches the threshold."""
    return tuple(f"sss_confident_fraction_c{c}" for c in range(num_classes))


def split_batch_across_ranks(global_batch_size: int, world_size: int, rank: int) -> int:
    """This rank's share of a global batch, split exactly as nnU-Net splits the labeled batch under DDP."""
    base = global_batch_size // world_size
    return base + 1 if base * world_size + rank < global_batch_size else base


def channel_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """UniMatch's feature perturbation: drop whole channels (2D or 3D features)."""
    return F.dropout3d(x, p, training=True) if x.dim() == 5 else F.dropout2d(x, p, training=True)


@dataclass
class UnlabeledStep:
    """What the unsupervised hooks of one iteration share (all tensors on the trainer's device).

    Maps are (B, *spatial); ``valid`` is 1 inside the image after augmentation; ``partner`` indexes each sample's
    CutMix partner in the mix batch ``x_mix_*``; ``box1``/``box2`` are the CutMix boxes of the two strong views.
    """

    x_w: torch.Tensor
    x_s1: torch.Tensor
    x_s2: torch.Tensor
    valid: torch.Tensor
    sam_map: torch.Tensor | None
    box1: torch.Tensor
    box2: torch.Tensor
    # mix partners: weak view (for their pseudo-labels), strong views, validity, SAM map
    mix_w: torch.Tensor
    mix_s1: torch.Tensor
    mix_s2: torch.Tensor
    mix_valid: torch.Tensor
    mix_sam_map: torch.Tensor | None
    mix_is_batch: bool  # partners are a permutation of this batch (their weak logits come from the shared pass)
    partner: torch.Tensor
    # filled by the hooks
    skips_w: list[torch.Tensor] = field(default_factory=list)
    mix_skips_w: list[torch.Tensor] = field(default_factory=list)
    logits_w: torch.Tensor | None = None
    logits_mix_w: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    conf: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    mixed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    skips_s: list[torch.Tensor] = field(default_factory=list)
    out_s1: list[torch.Tensor] = field(default_factory=list)
    out_s2: list[torch.Tensor] = field(default_factory=list)
    logs: dict[str, float] = field(default_factory=dict)


def as_list(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Deep-supervision outputs as a list (one entry without deep supervision)."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


class nnUNetTrainerUniMatch(RunSettingsMixin, nnUNetTrainer):
    """Weak-to-strong consistency (UniMatch) on unlabeled images inside nnU-Net; no DFE, no SAM-2.

    Loss = nnU-Net's own supervised loss, unscaled (CE + Dice with deep supervision, exactly as a stock run), plus
    ramp(t) * (lambda_s1 * L_s1 + lambda_s2 * L_s2 + lambda_fp * L_fp [+ lambda_dfe * L_dfe]) [+ SAM term], where each
    L is the masked CE + Dice of ``MaskedCEDiceLoss`` (nnU-Net's loss form). UniMatch's relative weights: its
    medical code uses (sup + 0.25 s1 + 0.25 s2 + 0.5 fp) / 2 with sup = (CE + Dice) / 2 and an unsupervised Dice
    only; the unsupervised terms together weigh as much as the supervised one there and here.
    """

    # unlabeled batch = round(labeled batch * ratio) (at least 2), as UniMatch (equal labeled/unlabeled batches)
    unlabeled_batch_ratio: float = 1.0
    # CutMix partners: "batch" = a random other sample of the same unlabeled batch (no extra forward); "draw" = a
    # separate unlabeled batch as UniMatch does (one more loader draw and a no-grad forward for its pseudo-labels)
    mix_partners: str = "batch"
    confidence_threshold: float = 0.95
    class_adaptive_threshold: bool = False  # per-class thresholds scaled by each class's confidence (see losses.py)
    lambda_s1: float = 0.25
    lambda_s2: float = 0.25
    lambda_fp: float = 0.5
    lambda_dfe: float = 0.0
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
        self.dfe: DFE | None = None
        self.ema_teacher: EMATeacher | None = None
        self.adaptive_threshold: ClassAdaptiveThreshold | None = None
        self.sss_step = 0
        self.unlabeled_loss = MaskedCEDiceLoss(do_bg=self.unsup_dice_do_bg)
        self.encoder_fn: nn.Module | None = None
        self.decoder_fn: nn.Module | None = None
        fraction = float_env("nnUNet_sss_unsup_warmup_fraction")
        if fraction is not None:
            self.unsup_warmup_fraction = fraction

    # ------------------------------------------------------------------ setup
    def initialize(self) -> None:
        if self.label_manager.has_regions:
            raise ValueError(f"{self.__class__.__name__} needs a label-based dataset: its pseudo-labels are softmax "
                             f"arg-max maps, which do not fit region-based (sigmoid, overlapping) training. Train "
                             f"this dataset with stock nnUNetTrainer, or define it with labels instead of regions.")
        super().initialize()
        net = unwrap_network(self.network)
        if self.use_dfe:
            self.dfe = DFE(net.encoder.output_channels, net.encoder.conv_op, self.dfe_num_scales).to(self.device)
            if self.is_ddp:  # DFE lives outside DDP: every rank must start from rank 0's random weights
                for p in self.dfe.parameters():
                    dist.broadcast(p.data, src=0)
            self.optimizer.add_param_group({"params": list(self.dfe.parameters())})
        if self.use_ema_teacher:
            self.ema_teacher = EMATeacher(net, self.ema_max_momentum)
        if self.mix_partners not in ("batch", "draw"):
            raise ValueError(f"mix_partners must be 'batch' or 'draw', got {self.mix_partners!r}")
        # train_step calls encoder and decoder separately (feature perturbation, DFE); compile them separately where
        # nnU-Net compiles the network, instead of bypassing torch.compile
        compile_parts = self._do_i_compile()
        self.encoder_fn = torch.compile(net.encoder) if compile_parts else net.encoder
        self.decoder_fn = torch.compile(net.decoder) if compile_parts else net.decoder
        self.unlabeled_batch_size = self._unlabeled_batch_size()
        self.adaptive_threshold = ClassAdaptiveThreshold(len(self.label_manager.all_labels),
                                                         self.confidence_threshold) \
            if self.class_adaptive_threshold else None

    def _unlabeled_batch_size(self) -> int:
        global_bs = max(2, round(self.configuration_manager.batch_size * self.unlabeled_batch_ratio))
        if self.is_ddp:
            return max(1, split_batch_across_ranks(global_bs, dist.get_world_size(), dist.get_rank()))
        return global_bs

    def _trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.network.parameters())
        if self.dfe is not None:
            params += list(self.dfe.parameters())
        return params

    @property
    def unlabeled_folder(self) -> str:
        from nnunetv2_sss.unlabeled.layout import unlabeled_preprocessed_folder

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
        rotation_for_DA, do_dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = get_unlabeled_transforms(self.configuration_manager.patch_size, rotation_for_DA, mirror_axes,
                                              do_dummy_2d)
        folder = self.unlabeled_folder
        dataset = infer_dataset_class(folder)(
            folder, folder_with_segs_from_previous_stage=str(self.sam_maps_folder) if self.use_sam else None)
        dl_u = nnUNetDataLoader(dataset, self.unlabeled_batch_size, initial_patch_size,
                                self.configuration_manager.patch_size, self.label_manager,
                                oversample_foreground_percent=0.0, transforms=transforms)
        n_proc = get_allowed_n_proc_DA()
        if n_proc == 0:
            self.dataloader_unlabeled = SingleThreadedAugmenter(dl_u, None)
        else:
            seeds = None if self.seed is None else [self.worker_seed(2) + i for i in range(n_proc)]
            self.dataloader_unlabeled = NonDetMultiThreadedAugmenter(
                data_loader=dl_u, transform=None, num_processes=n_proc, num_cached=max(6, n_proc // 2), seeds=seeds,
                pin_memory=self.device.type == "cuda", wait_time=0.002)
        return dl_tr, dl_val

    def on_train_end(self) -> None:
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()
        self.dataloader_unlabeled = None

    # ------------------------------------------------------------------ losses
    def _ds_weights(self, n_outputs: int) -> Sequence[float]:
        weights = getattr(self.loss, "weight_factors", None)
        return weights if weights is not None and len(weights) == n_outputs else (1.0,) + (0.0,) * (n_outputs - 1)

    def unsupervised_loss(self, outputs: list[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
        """Masked CE + Dice against a pseudo-label at every deep-supervision output (nnU-Net's weights)."""
        labels_ds, mask_ds, valid_ds = deep_supervision_targets(outputs, labels, mask, valid)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, o, lab, m, v in zip(self._ds_weights(len(outputs)), outputs, labels_ds, mask_ds, valid_ds):
            if w != 0:
                total = total + w * self.unlabeled_loss(o, lab, m, v)
        return total

    def sam_loss_weight(self) -> float:
        """Weight of the SAM-2 term this epoch (subclasses ramp it); 0 disables it."""
        return 0.0

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

    def unsupervised_weights(self) -> dict[str, float]:
        """This step's weight of each unsupervised term (0 skips the term's computation)."""
        r = self.unsupervised_rampup()
        return {"s1": r * self.lambda_s1, "s2": r * self.lambda_s2, "fp": r * self.lambda_fp,
                "dfe": r * self.lambda_dfe if self.dfe is not None else 0.0,
                "sam": self.sam_loss_weight() if self.use_sam else 0.0}

    # ------------------------------------------------------------------ the step's hooks
    def _split_views(self, ub: dict) -> tuple[torch.Tensor, ...]:
        u = ub["data"].to(self.device, non_blocking=True)
        seg = ub["target"].to(self.device, non_blocking=True)
        c = u.shape[1] // NUM_VIEWS
        valid = (seg[:, 0] >= 0).float()
        sam_map = seg[:, 1].long() if self.use_sam and seg.shape[1] > 1 else None
        return u[:, :c], u[:, c:2 * c], u[:, 2 * c:], valid, sam_map

    def sample_unlabeled(self) -> UnlabeledStep:
        """The unlabeled batch as weak/strong views, its CutMix partners and the two strong views' boxes."""
        x_w, x_s1, x_s2, valid, sam_map = self._split_views(next(self.dataloader_unlabeled))
        n_u, spatial = x_w.shape[0], tuple(x_w.shape[2:])
        if self.mix_partners == "draw":
            m_w, m_s1, m_s2, m_valid, m_sam = self._split_views(next(self.dataloader_unlabeled))
            partner = torch.arange(n_u, device=self.device)
            mix_is_batch = False
        else:  # a random derangement of the batch: every sample gets another sample as partner
            m_w, m_s1, m_s2, m_valid, m_sam = x_w, x_s1, x_s2, valid, sam_map
            order = torch.randperm(n_u)
            shift = int(torch.randint(1, n_u, (1,)).item()) if n_u > 1 else 0
            partner = torch.empty_like(order)
            partner[order] = order.roll(shift)
            partner = partner.to(self.device)
            mix_is_batch = True
        mix_p = self.cutmix_p if (n_u > 1 or not mix_is_batch) else 0.0
        box1 = cutmix_masks(n_u, spatial, p=mix_p, device=self.device)
        box2 = cutmix_masks(n_u, spatial, p=mix_p, device=self.device)
        return UnlabeledStep(
            x_w=x_w, x_s1=apply_cutmix(x_s1, m_s1[partner], box1), x_s2=apply_cutmix(x_s2, m_s2[partner], box2),
            valid=valid, sam_map=sam_map, box1=box1, box2=box2, mix_w=m_w, mix_s1=m_s1, mix_s2=m_s2,
            mix_valid=m_valid, mix_sam_map=m_sam, mix_is_batch=mix_is_batch, partner=partner)

    def forward_labeled_and_weak(self, data: torch.Tensor, u: UnlabeledStep) -> list[torch.Tensor]:
        """One encoder pass over labeled + weak (as UniMatch); returns the labeled outputs, keeps the weak ones."""
        n_l = data.shape[0]
        skips = self.encoder_fn(torch.cat((data, u.x_w)))
        outs = as_list(self.decoder_fn(skips))
        u.skips_w = [s[n_l:] for s in skips]
        u.logits_w = outs[0][n_l:].detach()
        return [o[:n_l] for o in outs]

    def supervised_loss(self, out_l: list[torch.Tensor], target) -> torch.Tensor:
        """nnU-Net's own loss on the labeled batch, unscaled (deep supervision as configured)."""
        return self.loss(out_l if isinstance(target, list) else out_l[0], target)

    @torch.no_grad()
    def weak_logits(self, u: UnlabeledStep) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits that make the pseudo-labels of the batch and of its mix partners (student or EMA teacher)."""
        if self.ema_teacher is not None:
            x = u.x_w if u.mix_is_batch else torch.cat((u.x_w, u.mix_w))
            t = as_list(self.ema_teacher.model(x))[0]
            return t[:u.x_w.shape[0]], (t if u.mix_is_batch else t[u.x_w.shape[0]:])
        if u.mix_is_batch:
            return u.logits_w, u.logits_w
        u.mix_skips_w = self.encoder_fn(u.mix_w)
        return u.logits_w, as_list(self.decoder_fn(u.mix_skips_w))[0]

    def make_pseudo_labels(self, u: UnlabeledStep) -> None:
        """Confident arg-max pseudo-labels of the weak view, and their CutMix'ed copies for both strong views."""
        logits, logits_mix = self.weak_logits(u)
        u.labels, u.conf, mask = pseudo_label(logits, self.confidence_threshold)
        labels_m, conf_m, mask_m = pseudo_label(logits_mix, self.confidence_threshold)
        if self.adaptive_threshold is not None:
            self.adaptive_threshold.update(u.labels, u.conf, u.valid)
            mask = self.adaptive_threshold.mask(u.labels, u.conf)
            mask_m = self.adaptive_threshold.mask(labels_m, conf_m)
        u.mask = mask * u.valid
        mask_m = mask_m * u.mix_valid
        for view, box in (("s1", u.box1), ("s2", u.box2)):
            u.mixed[view] = tuple(apply_cutmix(a, b[u.partner], box) for a, b in
                                  ((u.labels, labels_m), (u.mask, mask_m), (u.valid, u.mix_valid)))

    def strong_view_losses(self, u: UnlabeledStep) -> dict[str, torch.Tensor]:
        """Both strong views through the student in one pass, each against its mixed pseudo-label."""
        n_u = u.x_w.shape[0]
        u.skips_s = self.encoder_fn(torch.cat((u.x_s1, u.x_s2)))
        out_s = as_list(self.decoder_fn(u.skips_s))
        u.out_s1, u.out_s2 = [o[:n_u] for o in out_s], [o[n_u:] for o in out_s]
        return {"s1": self.unsupervised_loss(u.out_s1, *u.mixed["s1"]),
                "s2": self.unsupervised_loss(u.out_s2, *u.mixed["s2"])}

    def feature_perturbation_loss(self, u: UnlabeledStep) -> torch.Tensor:
        """UniMatch's feature-perturbation stream: channel dropout on the weak encoder features."""
        out_fp = as_list(self.decoder_fn([channel_dropout(s, self.feature_dropout_p) for s in u.skips_w]))
        return self.unsupervised_loss(out_fp, u.labels, u.mask, u.valid)

    def dfe_loss(self, u: UnlabeledStep) -> torch.Tensor:
        """DFE between the weak features (mixed with view 1's box, so both inputs show the same mixed image) and
        strong view 1's features; the decoder's prediction from the enhanced features learns view 1's target."""
        n_u = u.x_w.shape[0]
        if u.mix_is_batch:
            mix_skips = [s[u.partner] for s in u.skips_w]
        else:
            if not u.mix_skips_w:
                with torch.no_grad():
                    u.mix_skips_w = self.encoder_fn(u.mix_w)
            mix_skips = [s[u.partner] for s in u.mix_skips_w]
        weak_mixed = [apply_cutmix(s, m, resize_like(u.box1, tuple(s.shape[2:])))
                      for s, m in zip(u.skips_w, mix_skips)]
        enhanced, sim = self.dfe(weak_mixed, [s[:n_u] for s in u.skips_s])
        u.logs["sss_dfe_similarity"] = sim.mean().item()
        return self.unsupervised_loss(as_list(self.decoder_fn(enhanced)), *u.mixed["s1"])

    def sam_loss(self, u: UnlabeledStep) -> torch.Tensor | None:
        """Both strong views against the SAM-2 map (warped with the weak view, mixed like the pseudo-labels)."""
        if u.sam_map is None:
            return None
        sam_valid = (u.sam_map >= 0).float() * u.valid
        mix_valid = (u.mix_sam_map >= 0).float() * u.mix_valid
        terms = []
        for out, box in ((u.out_s1, u.box1), (u.out_s2, u.box2)):
            target = apply_cutmix(u.sam_map, u.mix_sam_map[u.partner], box)
            m = apply_cutmix(sam_valid, mix_valid[u.partner], box)
            v = apply_cutmix(u.valid, u.mix_valid[u.partner], box)
            terms.append(self.unsupervised_loss(out, target, m, v))
        return 0.5 * (terms[0] + terms[1])

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, cross-rank gradient average (our forwards bypass DDP's hooks), clip at 12 as nnU-Net, step."""
        params = self._trainable_parameters()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self._average_gradients_across_ranks(params)
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self._average_gradients_across_ranks(params)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()

    def step_logs(self, u: UnlabeledStep) -> dict[str, float]:
        """Confident fraction overall and per class (share of each class's pseudo-labelled pixels kept)."""
        logs = {"sss_confident_fraction": (u.mask.sum() / u.valid.sum().clamp(min=1)).item()}
        for c, key in enumerate(self.class_fraction_keys):
            of_class = (u.labels == c).float() * u.valid
            n = of_class.sum()
            logs[key] = (u.mask * of_class).sum().item() / n.item() if n > 0 else math.nan
        return logs

    # ------------------------------------------------------------------ training
    def supervised_warmup_step(self, batch: dict) -> dict:
        """nnU-Net's own step (its forward, loss, gradient and clipping); no unlabeled batch is drawn."""
        result = nnUNetTrainer.train_step(self, batch)
        self.sss_step += 1
        loss = float(np.asarray(result["loss"]))
        for k in LOSS_KEYS + FRACTION_KEYS + self.class_fraction_keys:
            if k != "sss_sam_agreement":
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
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            l_sup = self.supervised_loss(self.forward_labeled_and_weak(data, u), target)
            self.make_pseudo_labels(u)
            terms: dict[str, torch.Tensor | None] = dict(self.strong_view_losses(u))
            terms["fp"] = self.feature_perturbation_loss(u) if weights["fp"] > 0 else None
            terms["dfe"] = self.dfe_loss(u) if self.dfe is not None and weights["dfe"] > 0 else None
            terms["sam"] = self.sam_loss(u) if weights["sam"] > 0 else None
            loss = l_sup
            for k, t in terms.items():
                if t is not None:
                    loss = loss + weights[k] * t
        self.optimizer_step(loss)
        if self.ema_teacher is not None:  # step 0 has momentum 0: the teacher starts as the (pretrained) student
            self.ema_teacher.update(unwrap_network(self.network), self.sss_step - warmup)
        self.sss_step += 1

        logs = {"sss_loss_sup": l_sup.item(), **u.logs, **self.step_logs(u)}
        logs.update({f"sss_loss_{k}": t.item() for k, t in terms.items() if t is not None})
        result = {"loss": loss.detach().cpu().numpy()}
        for k in LOSS_KEYS + FRACTION_KEYS + self.class_fraction_keys:
            if k != "sss_sam_agreement":
                result[k] = np.array(logs.get(k, np.nan), dtype=np.float64)
        return result

    def _average_gradients_across_ranks(self, params: list[nn.Parameter]) -> None:
        """DDP's hooks only fire for forwards through the DDP wrapper; we call encoder/decoder directly."""
        if not self.is_ddp:
            return
        world = dist.get_world_size()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        collated = collate_outputs(train_outputs)
        for k in LOSS_KEYS + FRACTION_KEYS + self.class_fraction_keys:
            if k == "sss_sam_agreement":
                continue
            vals = np.asarray(collated[k], dtype=np.float64)
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, vals)
                vals = np.concatenate([np.ravel(g) for g in gathered])
            value = float(np.nanmean(vals)) if np.any(np.isfinite(vals)) else math.nan
            self.logger.log(k, value, self.current_epoch)
        self.logger.log("sss_sam_agreement", self.sam_agreement_this_epoch(), self.current_epoch)
        self.print_to_log_file("unsupervised: " + ", ".join(
            f"{k.removeprefix('sss_')} {self.logger.get_value(k, step=-1):.4f}" for k in LOSS_KEYS + FRACTION_KEYS))

    def sam_agreement_this_epoch(self) -> float:
        """SAM-student Dice of the latest refresh (NaN without SAM)."""
        return math.nan

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        state = {"sss_step": self.sss_step}
        if self.dfe is not None:
            state["dfe"] = self.dfe.state_dict()
        if self.ema_teacher is not None:
            state["ema_teacher"] = self.ema_teacher.state_dict()
        if self.adaptive_threshold is not None:
            state["class_mean_confidence"] = self.adaptive_threshold.mean_conf.clone()
        return state

    def load_extra_checkpoint_state(self, state: dict) -> None:
        self.sss_step = state.get("sss_step", 0)
        if self.dfe is not None and "dfe" in state:
            self.dfe.load_state_dict(state["dfe"])
        if self.ema_teacher is not None and "ema_teacher" in state:
            self.ema_teacher.load_state_dict(state["ema_teacher"])
        if self.adaptive_threshold is not None and "class_mean_confidence" in state:
            self.adaptive_threshold.mean_conf = state["class_mean_confidence"].clone().cpu()

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus our state ('sss_state'), written once, complete, to a temporary name that is
        fsync'ed and renamed (nnU-Net's own write is not atomic; see training/checkpoints.py)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # rank != 0: nothing; disabled: nnU-Net logs that
            return
        save_complete_checkpoint(filename, super().save_checkpoint, self.extra_checkpoint_state())

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """Resume only with our state: an unreadable checkpoint or one without 'sss_state' gives way to the newest
        complete one in the fold folder (with a warning), or to a clear error when there is none."""
        if isinstance(filename_or_checkpoint, dict):
            if SSS_STATE_KEY not in filename_or_checkpoint:
                raise CheckpointError(f"This checkpoint has no '{SSS_STATE_KEY}': {self.__class__.__name__} cannot "
                                      f"resume from it without silently restarting DFE, the EMA teacher and its step "
                                      f"counter. Use -pretrained_weights to start from its network weights.")
            path, checkpoint = filename_or_checkpoint, filename_or_checkpoint
        else:
            path, checkpoint = resolve_resume_checkpoint(
                filename_or_checkpoint, lambda m: self.print_to_log_file(m, also_print_to_console=True))
            path = str(path)
        super().load_checkpoint(path)
        self.load_extra_checkpoint_state(checkpoint[SSS_STATE_KEY])
        self.logger.local_logger.add_missing_keys()


class nnUNetTrainerSSS_noSAM(nnUNetTrainerUniMatch):
    """SSS without SAM-2: weak-to-strong consistency plus Discriminative Feature Enhancement (DFE)."""

    use_dfe = True
    lambda_dfe = 0.25


class nnUNetTrainerUniMatch_EMA(nnUNetTrainerUniMatch):
    """UniMatch with pseudo-labels from an EMA teacher (UniMatch V2 style)."""

    use_ema_teacher = True


class nnUNetTrainerSSS_noSAM_EMA(nnUNetTrainerSSS_noSAM):
    use_ema_teacher = True
