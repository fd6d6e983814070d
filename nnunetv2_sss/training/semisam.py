"""SemiSAM (Zhang et al. 2023) in nnU-Net: a mean teacher plus SAM-2 masks as an extra consistency target."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunetv2_sss.consistency.losses import resize_like
from nnunetv2_sss.training.sam_trainers import SAMRefreshMixin
from nnunetv2_sss.training.semi_supervised import nnUNetTrainerUniMatch
from nnunetv2_sss.training.unlabeled_stream import UnlabeledBatch
from nnunetv2_sss.training.weak_to_strong import PseudoLabels, StrongPass, WeakPass, as_list


def soft_consistency_mse(outputs: list[torch.Tensor], target_probs: torch.Tensor, weight: torch.Tensor,
                         ds_weights: list[float] | tuple[float, ...]) -> torch.Tensor:
    """Mean-teacher consistency: mean over classes of (softmax(output) - target)^2, averaged over the pixels where
    ``weight`` (B, *spatial) is 1, at every deep-supervision output with nnU-Net's weights.

    ``target_probs`` (B, C, *spatial) is a soft (teacher) or one-hot (SAM-2) target at full resolution; it is
    area-averaged to each lower output (a probability map, so averaging is the right downsampling), ``weight`` is
    nearest-resized like nnU-Net's segmentation targets."""
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for w, out in zip(ds_weights, outputs):
        if w == 0:
            continue
        size = tuple(out.shape[2:])
        target = target_probs if tuple(target_probs.shape[2:]) == size else F.interpolate(
            target_probs.float(), size=size, mode="area")
        m = resize_like(weight, size).float()
        sq = ((torch.softmax(out.float(), 1) - target.float()) ** 2).mean(1)
        total = total + w * (sq * m).sum() / m.sum().clamp(min=1.0)
    return total


class nnUNetTrainerSemiSAM(SAMRefreshMixin, nnUNetTrainerUniMatch):
    """SemiSAM (Zhang et al. 2023) in nnU-Net: a mean teacher plus SAM-2 masks as an extra consistency target.

    Per iteration: nnU-Net's supervised loss on the labeled batch; the EMA teacher's SOFT prediction (softmax) of
    the weak view of each unlabeled patch is the target of the student's prediction of a perturbed view of the same
    patch (strong intensity view, same geometry), by MSE over all valid pixels, weighted ``lambda_s1`` (0.1) times a
    sigmoid ramp-up over ``unsup_rampup_fraction`` of the run (1.0: the whole run, as SSL4MIS/UA-MT's mean teacher
    with consistency 0.1 and a ramp over its 30 000 / 6 000 iterations); plus, once SAM-2 has refreshed, the same
    student prediction against SAM-2's mask (one-hot, MSE, on the pixels the map labels) with ``sam_loss_weight()``.
    SAM-2's prompts come from the student's prediction only (the refresh runs ``self.network``), never from the
    teacher or ground truth. No confidence threshold, no CutMix, no feature perturbation, no DFE: those are SSS's
    and UniMatch's. The step's logs: ``loss_s1`` is the mean-teacher term, ``loss_sam`` the SAM-2 term.
    """

    use_ema_teacher = True
    use_dfe = False
    lambda_s1 = 0.1  # the mean-teacher consistency weight
    lambda_s2 = 0.0
    lambda_fp = 0.0
    cutmix_p = 0.0
    confidence_threshold = 0.0
    unsup_rampup_fraction = 1.0
    pseudo_label_mirroring = False  # the teacher's soft targets come from make_pseudo_labels below, unmirrored

    def forward_labeled_and_weak(self, data: torch.Tensor, u: UnlabeledBatch) -> tuple[list[torch.Tensor], WeakPass]:
        """One student pass over the labeled batch and the PERTURBED (strong 1) unlabeled view; the weak view goes
        to the teacher only."""
        n_l = data.shape[0]
        outs = as_list(self.decoder_fn(self.encoder_fn(torch.cat((data, u.x_s1)))))
        return [o[:n_l] for o in outs], WeakPass(outputs=[o[n_l:] for o in outs])

    def make_pseudo_labels(self, u: UnlabeledBatch, weak: WeakPass) -> PseudoLabels:
        """The EMA teacher's logits of the weak view (kept soft); arg-max and confidence only for the logged
        per-class fractions (threshold 0: every valid pixel counts)."""
        with torch.no_grad():
            logits = as_list(self.ema_teacher.model(u.x_w))[0].float()
            conf, labels = torch.softmax(logits, 1).max(1)
        return PseudoLabels(labels, conf, (conf >= self.confidence_threshold).float() * u.valid, soft=logits)

    def strong_view_losses(self, u: UnlabeledBatch, weak: WeakPass,
                           pl: PseudoLabels) -> tuple[dict[str, torch.Tensor], StrongPass]:
        """Mean-teacher consistency: the student's perturbed-view prediction against the teacher's soft one."""
        teacher = torch.softmax(pl.soft, 1)
        loss = soft_consistency_mse(weak.outputs, teacher, u.valid, self._ds_weights(len(weak.outputs)))
        return {"s1": loss}, StrongPass([], weak.outputs, [])

    def sam_loss(self, u: UnlabeledBatch, strong: StrongPass) -> torch.Tensor | None:
        """The same student prediction against SAM-2's map (warped with the view), on the pixels it labels."""
        if u.sam_map is None:
            return None
        labelled = (u.sam_map >= 0) & (u.valid > 0)
        onehot = F.one_hot(u.sam_map.clamp(min=0), strong.out_s1[0].shape[1]).movedim(-1, 1).float()
        return soft_consistency_mse(strong.out_s1, onehot, labelled.float(), self._ds_weights(len(strong.out_s1)))
