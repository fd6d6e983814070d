"""Pseudo-labels with confidence masks and the masked losses that train strong views against them.

A pixel's pseudo-label is the weak view's arg-max; it only counts when the weak view's softmax confidence reaches
the threshold (UniMatch's 0.95 by default); a pixel whose arg-max is background may be held to a stricter
threshold of its own (``background_threshold``). Pixels marked invalid (outside the image after augmentation, or
where a SAM-2 map has no label) never count. Optionally the weak prediction is averaged over mirror images first
(``mirror_averaged_logits``, nnU-Net's test-time mirroring).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from nnunetv2.utilities.ddp_allgather import AllGatherGrad
from torch import distributed as dist
from torch import nn


@torch.no_grad()
def pseudo_label(logits: torch.Tensor, threshold: float, background_threshold: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels (B, *sp) long, confidence (B, *sp), mask (B, *sp) float) from weak-view logits (B, C, *sp).

    ``background_threshold`` (None: ``threshold``) applies to the pixels whose arg-max is background (class 0).
    Why a separate one: the errors that teach a student to shrink a structure are the structure's pixels
    confidently called background, and background is the class a segmentation network is most confident in."""
    probs = torch.softmax(logits.float(), dim=1)
    conf, labels = probs.max(dim=1)
    if background_threshold is None:
        return labels, conf, (conf >= threshold).float()
    per_pixel = torch.where(labels == 0, background_threshold, threshold)
    return labels, conf, (conf >= per_pixel).float()


@torch.no_grad()
def mirror_averaged_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, logits: torch.Tensor,
                           axes: Sequence[int] | None) -> torch.Tensor:
    """Logits whose softmax is the mean softmax over ``x`` and its mirror images along every combination of the
    spatial ``axes`` (nnU-Net's test-time mirroring, applied to the weak view); ``logits`` is ``forward(x)``.

    Why: a pseudo-label is only as good as the weak prediction, and nnU-Net itself predicts with mirroring because
    the averaged prediction is the more accurate one; averaging costs one no-grad forward per mirror combination.
    nnU-Net's predictor averages logits; here the probabilities are averaged, so the confidence that the threshold
    reads is the mean confidence of the views. Returns ``logits`` unchanged when ``axes`` is empty or None."""
    if not axes:
        return logits
    probs = torch.softmax(logits.float(), dim=1)
    combos = [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
    for combo in combos:
        dims = [a + 2 for a in combo]
        probs += torch.softmax(torch.flip(forward(torch.flip(x, dims)), dims).float(), dim=1)
    return torch.log((probs / (len(combos) + 1)).clamp(min=1e-12))


class ClassAdaptiveThreshold:
    """Per-class confidence thresholds τ_c = τ · p̄_c / max_k p̄_c (self-adaptive, as FreeMatch's class-wise
    thresholds), p̄_c an EMA of the mean confidence of the pixels predicted as class c.

    Why: with one global τ = 0.95 the background, predicted at ~0.99, passes everywhere while a young model's
    foreground (median confidence ~0.7 on Hippocampus after 600 iterations) almost never does, so the confident
    pseudo-labels are background only and the unsupervised terms pull foreground towards background. Scaling τ by
    each class's own confidence keeps the most confident part of every class. The EMA starts at 1/C per class
    (no class favoured) and is part of the trainer's checkpoint state."""

    def __init__(self, num_classes: int, threshold: float, momentum: float = 0.99):
        self.threshold, self.momentum = threshold, momentum
        self.mean_conf = torch.full((num_classes,), 1.0 / num_classes)

    @torch.no_grad()
    def update(self, labels: torch.Tensor, conf: torch.Tensor, valid: torch.Tensor) -> None:
        c = self.mean_conf.numel()
        w = valid.flatten().float()
        lab, cf = labels.flatten(), conf.flatten().float()
        count = torch.zeros(c, device=cf.device).index_add_(0, lab, w)
        total = torch.zeros(c, device=cf.device).index_add_(0, lab, cf * w)
        seen = (count > 0).cpu()
        batch_mean = (total / count.clamp(min=1)).cpu()
        m = self.momentum
        self.mean_conf[seen] = m * self.mean_conf[seen] + (1 - m) * batch_mean[seen]

    def thresholds(self) -> torch.Tensor:
        return self.threshold * self.mean_conf / self.mean_conf.max().clamp(min=1e-8)

    def mask(self, labels: torch.Tensor, conf: torch.Tensor, background_threshold: float | None = None
             ) -> torch.Tensor:
        """Confident pixels under the per-class thresholds; ``background_threshold`` replaces background's."""
        t = self.thresholds().to(conf.device)
        if background_threshold is not None:
            t[0] = background_threshold
        return (conf >= t[labels]).float()


class MaskedCEDiceLoss(nn.Module):
    """CE + (1 - soft Dice) on the pixels where ``mask`` > 0: nnU-Net's loss form, at nnU-Net's scale.

    The unsupervised terms are weighted relative to nnU-Net's own (unscaled) supervised CE + Dice, so they use the
    same form. The masked CE is divided by the number of *valid* pixels, not the confident ones (as UniMatch does),
    so a batch with few confident pixels contributes little instead of a noisy large term. The Dice is a batch soft
    Dice restricted to the mask; background is included by default, as in UniMatch's medical code (its unsupervised
    loss is a Dice over all classes), because under a confidence mask the background Dice is what penalises
    foreground spilling into confident background.
    """

    def __init__(self, smooth: float = 1e-5, do_bg: bool = True, ce_weight: float = 1.0, dice_weight: float = 1.0,
                 ddp: bool | None = None):
        super().__init__()
        self.smooth = smooth
        self.do_bg = do_bg
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        # None: sum over ranks whenever torch.distributed is initialised (multi-GPU), like nnU-Net's batch Dice
        self.ddp = ddp

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        target = target.long()
        valid = torch.ones_like(mask) if valid is None else valid.float()
        mask = mask * valid
        ce = F.cross_entropy(logits.float(), target.clamp(min=0), reduction="none")
        ce_sum, n_valid = (ce * mask).sum(), valid.sum()

        probs = torch.softmax(logits.float(), dim=1)
        onehot = torch.zeros_like(probs).scatter_(1, target.clamp(min=0).unsqueeze(1), 1.0)
        m = mask.unsqueeze(1)
        axes = [0] + list(range(2, probs.dim()))
        inter = (probs * onehot * m).sum(axes)
        denom = (probs * m).sum(axes) + (onehot * m).sum(axes)
        if self.ddp or (self.ddp is None and dist.is_available() and dist.is_initialized()):
            # the whole global batch's sums on every rank (gradients flow back to each rank's share), so that the
            # ranks' averaged gradients equal one process's with the whole batch (tests/test_ddp.py)
            ce_sum, n_valid, inter, denom = (AllGatherGrad.apply(t).sum(0) for t in (ce_sum, n_valid, inter, denom))
        ce = ce_sum / n_valid.clamp(min=1.0)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        if not self.do_bg:
            dice = dice[1:]
        return self.ce_weight * ce + self.dice_weight * (1 - dice.mean())


def resize_like(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Nearest-neighbour resize of a (B, *sp) map to a deep-supervision output's spatial size."""
    if tuple(x.shape[1:]) == tuple(size):
        return x
    return F.interpolate(x.unsqueeze(1).float(), size=size, mode="nearest-exact").squeeze(1).to(x.dtype)


def deep_supervision_targets(outputs: list[torch.Tensor] | torch.Tensor,
                             *maps: torch.Tensor) -> list[list[torch.Tensor]]:
    """For each map (labels, masks), one nearest-resized copy per network output (nnU-Net's deep supervision)."""
    outs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    return [[resize_like(m, tuple(o.shape[2:])) for o in outs] for m in maps]


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - t)^2) for t = progress in [0, 1] (Laine & Aila; the mean-teacher ramp), 1 beyond."""
    t = min(max(progress, 0.0), 1.0)
    return float(torch.exp(torch.tensor(-5.0 * (1.0 - t) ** 2)))
