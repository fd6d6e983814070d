"""Semi-supervised nnU-Net trainers: UniMatch-style weak-to-strong consistency, DFE, EMA teacher, SAM-2 term.

Each iteration draws nnU-Net's labeled batch (its loss and augmentation unchanged) and an unlabeled batch whose
patches come as [weak, strong1, strong2] (see ``nnunetv2_sss.augment.views``). The labeled and weak patches share
one encoder pass (as UniMatch does); the weak prediction (or the EMA teacher's) gives confident pseudo-labels;
the strong views (CutMix'ed between unlabeled samples, pseudo-labels mixed the same way), a feature-perturbation
stream (channel dropout on the weak encoder features) and, optionally, the DFE stream are trained against them.
One backward, one optimizer step. The network itself stays a stock nnU-Net network: DFE, the teacher and SAM-2
live outside it, so ``nnUNetv2_predict`` loads the checkpoint like any other.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
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
from torch._dynamo import OptimizedModule

from nnunetv2_sss.augment.views import NUM_VIEWS, apply_cutmix, cutmix_masks, get_unlabeled_transforms
from nnunetv2_sss.consistency.dfe import DFE
from nnunetv2_sss.consistency.ema import EMATeacher
from nnunetv2_sss.consistency.losses import MaskedCEDiceLoss, deep_supervision_targets, pseudo_label, resize_like
from nnunetv2_sss.training.progress import SSSLocalLogger
from nnunetv2_sss.unlabeled.layout import SAM_PSEUDOLABEL_FOLDER
from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled

LOSS_KEYS = ("sss_loss_s1", "sss_loss_s2", "sss_loss_fp", "sss_loss_dfe", "sss_loss_sam")
FRACTION_KEYS = ("sss_confident_fraction", "sss_dfe_similarity", "sss_sam_agreement")


def split_batch_across_ranks(global_batch_size: int, world_size: int, rank: int) -> int:
    """This rank's share of a global batch, split exactly as nnU-Net splits the labeled batch under DDP."""
    base = global_batch_size // world_size
    return base + 1 if base * world_size + rank < global_batch_size else base


def apply_budget_from_env(trainer: nnUNetTrainer) -> None:
    """Training length from env vars, so a benchmark gives every trainer the same iteration budget."""
    for var, attr in (("nnUNet_sss_num_epochs", "num_epochs"),
                      ("nnUNet_sss_iterations_per_epoch", "num_iterations_per_epoch"),
                      ("nnUNet_sss_val_iterations_per_epoch", "num_val_iterations_per_epoch")):
        if os.environ.get(var):
            setattr(trainer, attr, int(os.environ[var]))


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain network under DDP (``.module``) and torch.compile (``._orig_mod``)."""
    mod = network.module if hasattr(network, "module") and not hasattr(network, "encoder") else network
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod


def channel_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """UniMatch's feature perturbation: drop whole channels (2D or 3D features)."""
    return F.dropout3d(x, p, training=True) if x.dim() == 5 else F.dropout2d(x, p, training=True)


class nnUNetTrainerUniMatch(nnUNetTrainer):
    """Weak-to-strong consistency (UniMatch) on unlabeled images inside nnU-Net; no DFE, no SAM-2."""

    # unlabeled batch = round(labeled batch * ratio), at least 2 so CutMix has a partner; 0.25 keeps an iteration
    # within ~2.5x the cost of a supervised one (scripts/benchmark_iteration.py)
    unlabeled_batch_ratio: float = 0.25
    confidence_threshold: float = 0.95
    # UniMatch: (sup + 0.25*s1 + 0.25*s2 + 0.5*fp) / 2
    lambda_s1: float = 0.25
    lambda_s2: float = 0.25
    lambda_fp: float = 0.5
    lambda_dfe: float = 0.0
    loss_normaliser: float = 2.0
    feature_dropout_p: float = 0.5
    cutmix_p: float = 0.5
    use_dfe: bool = False
    dfe_num_scales: int = 3
    use_ema_teacher: bool = False
    ema_max_momentum: float = 0.996
    use_sam: bool = False
    lambda_sam: float = 0.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger = SSSLocalLogger(LOSS_KEYS, FRACTION_KEYS)
        self.dataloader_unlabeled = None
        self.dfe: DFE | None = None
        self.ema_teacher: EMATeacher | None = None
        self.sss_step = 0
        self.unlabeled_loss = MaskedCEDiceLoss()
        apply_budget_from_env(self)

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
        self.unlabeled_batch_size = self._unlabeled_batch_size()

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
            self.dataloader_unlabeled = NonDetMultiThreadedAugmenter(
                data_loader=dl_u, transform=None, num_processes=n_proc, num_cached=max(6, n_proc // 2), seeds=None,
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
        total = outputs[0].new_zeros(())
        for w, o, lab, m, v in zip(self._ds_weights(len(outputs)), outputs, labels_ds, mask_ds, valid_ds):
            if w != 0:
                total = total + w * self.unlabeled_loss(o, lab, m, v)
        return total

    def sam_loss_weight(self) -> float:
        """Weight of the SAM-2 term this epoch (subclasses ramp it); 0 disables it."""
        return 0.0

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        ub = next(self.dataloader_unlabeled)
        u = ub["data"].to(self.device, non_blocking=True)
        u_seg = ub["target"].to(self.device, non_blocking=True)
        c = u.shape[1] // NUM_VIEWS
        x_w, x_s1, x_s2 = u[:, :c], u[:, c:2 * c], u[:, 2 * c:]
        valid = (u_seg[:, 0] >= 0).float()
        n_l, n_u = data.shape[0], x_w.shape[0]
        spatial = tuple(x_w.shape[2:])
        perm = torch.roll(torch.arange(n_u, device=self.device), 1)
        mix_p = self.cutmix_p if n_u > 1 else 0.0
        box1 = cutmix_masks(n_u, spatial, p=mix_p, device=self.device)
        box2 = cutmix_masks(n_u, spatial, p=mix_p, device=self.device)
        x_s1 = apply_cutmix(x_s1, x_s1[perm], box1)
        x_s2 = apply_cutmix(x_s2, x_s2[perm], box2)

        net = unwrap_network(self.network)
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            skips = net.encoder(torch.cat((data, x_w)))
            out = net.decoder(skips)
            outs = list(out) if isinstance(out, (list, tuple)) else [out]
            out_l = [o[:n_l] for o in outs]
            l_sup = self.loss(out_l if isinstance(out, (list, tuple)) else out_l[0], target)

            if self.ema_teacher is not None:
                with torch.no_grad():
                    t_out = self.ema_teacher.model(x_w)
                    logits_w = t_out[0] if isinstance(t_out, (list, tuple)) else t_out
            else:
                logits_w = outs[0][n_l:].detach()
            pl, conf, mask = pseudo_label(logits_w, self.confidence_threshold)
            mask = mask * valid
            pl1, mask1, valid1 = (apply_cutmix(t, t[perm], box1) for t in (pl, mask, valid))
            pl2, mask2, valid2 = (apply_cutmix(t, t[perm], box2) for t in (pl, mask, valid))

            skips_u = [s[n_l:] for s in skips]
            if self.lambda_fp > 0:  # SemiSAM has no feature-perturbation stream: skip its decoder pass
                out_fp = net.decoder([channel_dropout(s, self.feature_dropout_p) for s in skips_u])
                out_fp = list(out_fp) if isinstance(out_fp, (list, tuple)) else [out_fp]
                l_fp = self.unsupervised_loss(out_fp, pl, mask, valid)
            else:
                l_fp = outs[0].new_zeros(())

            skips_s = net.encoder(torch.cat((x_s1, x_s2)))
            out_s = net.decoder(skips_s)
            out_s = list(out_s) if isinstance(out_s, (list, tuple)) else [out_s]
            out_s1, out_s2 = [o[:n_u] for o in out_s], [o[n_u:] for o in out_s]
            l_s1 = self.unsupervised_loss(out_s1, pl1, mask1, valid1)
            l_s2 = self.unsupervised_loss(out_s2, pl2, mask2, valid2)

            loss = l_sup + self.lambda_s1 * l_s1 + self.lambda_s2 * l_s2 + self.lambda_fp * l_fp
            if self.dfe is not None:
                # weak features mixed with the same box as strong view 1 (nearest-downsampled per scale), so both
                # DFE inputs describe the same mixed image
                weak_mixed = [apply_cutmix(s, s[perm], resize_like(box1, tuple(s.shape[2:])))
                              for s in skips_u]
                adjusted, sim = self.dfe(weak_mixed, [s[:n_u] for s in skips_s])
                out_dfe = net.decoder(adjusted)
                out_dfe = list(out_dfe) if isinstance(out_dfe, (list, tuple)) else [out_dfe]
                l_dfe = self.unsupervised_loss(out_dfe, pl1, mask1, valid1)
                loss = loss + self.lambda_dfe * l_dfe
                logs["sss_loss_dfe"] = l_dfe.item()
                logs["sss_dfe_similarity"] = sim.mean().item()

            w_sam = self.sam_loss_weight() if self.use_sam else 0.0
            if w_sam > 0 and u_seg.shape[1] > 1:
                sam = u_seg[:, 1].long()
                sam_valid = (sam >= 0).float() * valid
                l_sam = 0.5 * sum(
                    self.unsupervised_loss(o, apply_cutmix(sam, sam[perm], b),
                                           apply_cutmix(sam_valid, sam_valid[perm], b),
                                           apply_cutmix(valid, valid[perm], b))
                    for o, b in ((out_s1, box1), (out_s2, box2)))
                loss = loss + w_sam * l_sam
                logs["sss_loss_sam"] = l_sam.item()
            loss = loss / self.loss_normaliser

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
        if self.ema_teacher is not None:  # step 0 has momentum 0: the teacher starts as the (pretrained) student
            self.ema_teacher.update(net, self.sss_step)
        self.sss_step += 1

        logs.update(sss_loss_s1=l_s1.item(), sss_loss_s2=l_s2.item(),
                    sss_loss_fp=l_fp.item() if self.lambda_fp > 0 else math.nan,
                    sss_confident_fraction=(mask.sum() / valid.sum().clamp(min=1)).item())
        result = {"loss": loss.detach().cpu().numpy()}
        for k in LOSS_KEYS + FRACTION_KEYS:
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
        for k in LOSS_KEYS + FRACTION_KEYS:
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
        return state

    def load_extra_checkpoint_state(self, state: dict) -> None:
        self.sss_step = state.get("sss_step", 0)
        if self.dfe is not None and "dfe" in state:
            self.dfe.load_state_dict(state["dfe"])
        if self.ema_teacher is not None and "ema_teacher" in state:
            self.ema_teacher.load_state_dict(state["ema_teacher"])

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus our state under its own key ('sss_state'), rewritten atomically."""
        super().save_checkpoint(filename)
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
        checkpoint["sss_state"] = self.extra_checkpoint_state()
        tmp = f"{filename}.tmp"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        self.load_extra_checkpoint_state(checkpoint.get("sss_state", {}))
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
