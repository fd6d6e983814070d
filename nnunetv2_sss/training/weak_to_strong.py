"""The hooks of one semi-supervised step, each with explicit inputs and outputs (no shared mutable bag).

Order in ``train_step`` (``training/semi_supervised.py``): ``sample_unlabeled`` -> ``forward_labeled_and_weak`` ->
``supervised_loss`` -> ``make_pseudo_labels`` -> ``strong_view_losses`` -> ``feature_perturbation_loss`` ->
``dfe_loss`` -> ``sam_loss``. A variant overrides one hook and keeps its signature (SemiSAM overrides four).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nnunetv2_sss.augment.views import apply_cutmix
from nnunetv2_sss.consistency.losses import deep_supervision_targets, mirror_averaged_logits, pseudo_label, resize_like
from nnunetv2_sss.training.unlabeled_stream import UnlabeledBatch


def as_list(out: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Deep-supervision outputs as a list (one entry without deep supervision)."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


def channel_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """UniMatch's feature perturbation: drop whole channels (2D or 3D features)."""
    return F.dropout3d(x, p, training=True) if x.dim() == 5 else F.dropout2d(x, p, training=True)


@dataclass(frozen=True)
class WeakPass:
    """The student's pass over the unlabeled part of the shared forward: encoder features and detached logits of
    the weak view (SemiSAM: ``outputs`` of its perturbed view, with gradient)."""

    skips: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class PseudoLabels:
    """Arg-max labels, confidence and confident-and-valid mask of the weak view; per strong view ('s1', 's2') the
    (labels, mask, valid) after that view's CutMix; ``mix_skips``: weak features of a separate mix draw when they
    were computed; ``soft``: teacher logits (SemiSAM's soft target)."""

    labels: torch.Tensor
    conf: torch.Tensor
    mask: torch.Tensor
    mixed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    mix_skips: list[torch.Tensor] | None = None
    soft: torch.Tensor | None = None


@dataclass(frozen=True)
class StrongPass:
    """Both strong views through the student: view 1's encoder features (DFE) and each view's outputs."""

    skips_s1: list[torch.Tensor]
    out_s1: list[torch.Tensor]
    out_s2: list[torch.Tensor]


class WeakToStrongHooks:
    """UniMatch's step pieces for a trainer with ``encoder_fn``/``decoder_fn``, ``unsupervised_loss``, thresholds,
    ``ema_teacher``, ``dfe``, ``adaptive_threshold`` and ``pseudo_label_mirroring`` (``nnUNetTrainerUniMatch``)."""

    def forward_labeled_and_weak(self, data: torch.Tensor, u: UnlabeledBatch) -> tuple[list[torch.Tensor], WeakPass]:
        """One encoder pass over labeled + weak (as UniMatch): the labeled outputs, and the weak pass."""
        n_l = data.shape[0]
        skips = self.encoder_fn(torch.cat((data, u.x_w)))
        outs = as_list(self.decoder_fn(skips))
        return [o[:n_l] for o in outs], WeakPass(skips=[s[n_l:] for s in skips], logits=outs[0][n_l:].detach())

    def supervised_loss(self, out_l: list[torch.Tensor], target) -> torch.Tensor:
        """nnU-Net's own loss on the labeled batch, unscaled (deep supervision as configured)."""
        return self.loss(out_l if isinstance(target, list) else out_l[0], target)

    @torch.no_grad()
    def weak_logits(self, u: UnlabeledBatch, weak: WeakPass) -> tuple[torch.Tensor, torch.Tensor,
                                                                      list[torch.Tensor] | None]:
        """Logits that make the pseudo-labels of the batch and of its mix partners (student or EMA teacher), and
        the student's weak features of a separate mix draw when this computed them."""
        axes = self.pseudo_label_mirror_axes()
        if self.ema_teacher is not None:
            def teacher(x: torch.Tensor) -> torch.Tensor:
                return as_list(self.ema_teacher.model(x))[0]
            x = u.x_w if u.mix_is_batch else torch.cat((u.x_w, u.mix_w))
            t = mirror_averaged_logits(teacher, x, teacher(x), axes)
            return t[:u.x_w.shape[0]], (t if u.mix_is_batch else t[u.x_w.shape[0]:]), None

        def student(x: torch.Tensor) -> torch.Tensor:
            return as_list(self.decoder_fn(self.encoder_fn(x)))[0]
        logits = mirror_averaged_logits(student, u.x_w, weak.logits, axes)
        if u.mix_is_batch:
            return logits, logits, None
        mix_skips = self.encoder_fn(u.mix_w)
        mix_logits = mirror_averaged_logits(student, u.mix_w, as_list(self.decoder_fn(mix_skips))[0], axes)
        return logits, mix_logits, mix_skips

    def pseudo_label_mirror_axes(self) -> tuple[int, ...] | None:
        """Spatial axes the weak prediction is mirrored along before it makes pseudo-labels: nnU-Net's inference
        mirror axes when ``pseudo_label_mirroring`` is on, else None."""
        return self.inference_allowed_mirroring_axes if self.pseudo_label_mirroring else None

    def make_pseudo_labels(self, u: UnlabeledBatch, weak: WeakPass) -> PseudoLabels:
        """Confident arg-max pseudo-labels of the weak view, and their CutMix'ed copies for both strong views."""
        logits, logits_mix, mix_skips = self.weak_logits(u, weak)
        tau, tau_bg = self.confidence_threshold, self.background_threshold
        labels, conf, mask = pseudo_label(logits, tau, tau_bg)
        labels_m, conf_m, mask_m = pseudo_label(logits_mix, tau, tau_bg)
        if self.adaptive_threshold is not None:
            self.adaptive_threshold.update(labels, conf, u.valid)
            mask = self.adaptive_threshold.mask(labels, conf, tau_bg)
            mask_m = self.adaptive_threshold.mask(labels_m, conf_m, tau_bg)
        mask = mask * u.valid
        mask_m = mask_m * u.mix_valid
        mixed = {view: tuple(apply_cutmix(a, b[u.partner], box) for a, b in
                             ((labels, labels_m), (mask, mask_m), (u.valid, u.mix_valid)))
                 for view, box in (("s1", u.box1), ("s2", u.box2))}
        return PseudoLabels(labels, conf, mask, mixed, mix_skips)

    def strong_view_losses(self, u: UnlabeledBatch, weak: WeakPass,
                           pl: PseudoLabels) -> tuple[dict[str, torch.Tensor], StrongPass]:
        """Both strong views through the student in one pass, each against its mixed pseudo-label."""
        n_u = u.x_w.shape[0]
        skips = self.encoder_fn(torch.cat((u.x_s1, u.x_s2)))
        out_s = as_list(self.decoder_fn(skips))
        strong = StrongPass([s[:n_u] for s in skips], [o[:n_u] for o in out_s], [o[n_u:] for o in out_s])
        return {"s1": self.unsupervised_loss(strong.out_s1, *pl.mixed["s1"]),
                "s2": self.unsupervised_loss(strong.out_s2, *pl.mixed["s2"])}, strong

    def feature_perturbation_loss(self, u: UnlabeledBatch, weak: WeakPass, pl: PseudoLabels) -> torch.Tensor:
        """UniMatch's feature-perturbation stream: channel dropout on the weak encoder features."""
        out_fp = as_list(self.decoder_fn([channel_dropout(s, self.feature_dropout_p) for s in weak.skips]))
        return self.unsupervised_loss(out_fp, pl.labels, pl.mask, u.valid)

    def dfe_loss(self, u: UnlabeledBatch, weak: WeakPass, strong: StrongPass,
                 pl: PseudoLabels) -> tuple[torch.Tensor, float]:
        """DFE between the weak features (mixed with view 1's box, so both inputs show the same mixed image) and
        strong view 1's features; the decoder's prediction from the enhanced features learns view 1's target.
        Returns the loss and the mean pooled similarity of the two views' features."""
        if u.mix_is_batch:
            mix_skips = [s[u.partner] for s in weak.skips]
        else:
            if pl.mix_skips is None:
                with torch.no_grad():
                    partner_skips = self.encoder_fn(u.mix_w)
            else:
                partner_skips = pl.mix_skips
            mix_skips = [s[u.partner] for s in partner_skips]
        weak_mixed = [apply_cutmix(s, m, resize_like(u.box1, tuple(s.shape[2:])))
                      for s, m in zip(weak.skips, mix_skips)]
        enhanced, sim = self.dfe(weak_mixed, strong.skips_s1)
        return self.unsupervised_loss(as_list(self.decoder_fn(enhanced)), *pl.mixed["s1"]), sim.mean().item()

    def sam_loss(self, u: UnlabeledBatch, strong: StrongPass) -> torch.Tensor | None:
        """Both strong views against the SAM-2 map (warped with the weak view, mixed like the pseudo-labels)."""
        if u.sam_map is None:
            return None
        sam_valid = (u.sam_map >= 0).float() * u.valid
        mix_valid = (u.mix_sam_map >= 0).float() * u.mix_valid
        terms = []
        for out, box in ((strong.out_s1, u.box1), (strong.out_s2, u.box2)):
            target = apply_cutmix(u.sam_map, u.mix_sam_map[u.partner], box)
            m = apply_cutmix(sam_valid, mix_valid[u.partner], box)
            v = apply_cutmix(u.valid, u.mix_valid[u.partner], box)
            terms.append(self.unsupervised_loss(out, target, m, v))
        return 0.5 * (terms[0] + terms[1])

    def unsupervised_loss(self, outputs: list[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
        """Masked CE + Dice against a pseudo-label at every deep-supervision output (nnU-Net's weights)."""
        labels_ds, mask_ds, valid_ds = deep_supervision_targets(outputs, labels, mask, valid)
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, o, lab, m, v in zip(self._ds_weights(len(outputs)), outputs, labels_ds, mask_ds, valid_ds):
            if w != 0:
                total = total + w * self.unlabeled_loss(o, lab, m, v)
        return total

    def _ds_weights(self, n_outputs: int) -> Sequence[float]:
        weights = getattr(self.loss, "weight_factors", None)
        return weights if weights is not None and len(weights) == n_outputs else (1.0,) + (0.0,) * (n_outputs - 1)
