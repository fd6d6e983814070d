"""Discriminative Feature Enhancement (DFE), our reading of SSS (Zhu et al. 2025, Sec. 4.2).

For a feature scale, weak-view and strong-view features go through one shared 1x1 projection and one shared 3x3
alignment conv (A_w, A_s). The cosine similarity s of the two views' global-average-pooled *input* features (so s
says whether the views agree, not whether two projections do) gives w = sigmoid(s), which weights a fusion of the
two after a per-pixel MLP; the discrepancy (A_s - A_w) is added back in proportion to how dissimilar the views are
(1 - s). A 1x1 output projection, initialised to zero, adds the result to the strong features as a residual:

    out = strong + P_out(w * MLP(A_w) + (1 - w) * MLP(A_s) + (1 - s) * (A_s - A_w))

so at step 0 DFE is exactly the identity and the shared decoder never sees noise from two random projections; the
enhancement grows only as far as the consistency loss asks for it. DFE is training-only: it lives outside the
network, so nnU-Net's inference never sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pooled_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the global-average-pooled features, one value per sample: (B,)."""
    axes = list(range(2, a.dim()))
    return F.cosine_similarity(a.float().mean(axes), b.float().mean(axes), dim=1, eps=1e-6)


def dfe_fuse(a_w: torch.Tensor, a_s: torch.Tensor, s: torch.Tensor, mlp: nn.Module) -> torch.Tensor:
    """w*MLP(A_w) + (1-w)*MLP(A_s) + (1-s)*(A_s - A_w) with w = sigmoid(s), s the views' similarity (B,)."""
    shape = (-1,) + (1,) * (a_w.dim() - 1)
    s = s.to(a_w.dtype).view(shape)
    w = torch.sigmoid(s)
    return w * mlp(a_w) + (1 - w) * mlp(a_s) + (1 - s) * (a_s - a_w)


class DFEScale(nn.Module):
    """DFE at one feature scale (2D or 3D, following the network's conv op); the identity at initialisation."""

    def __init__(self, channels: int, conv_op: type[nn.Module], hidden_channels: int | None = None):
        super().__init__()
        c = hidden_channels or channels
        self.proj_in = conv_op(channels, c, kernel_size=1)  # shared by both views
        self.align = conv_op(c, c, kernel_size=3, padding=1)  # shared by both views
        self.mlp = nn.Sequential(conv_op(c, 2 * c, kernel_size=1), nn.GELU(), conv_op(2 * c, c, kernel_size=1))
        self.proj_out = conv_op(c, channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, weak: torch.Tensor, strong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = pooled_cosine(weak, strong)
        a_w = self.align(self.proj_in(weak))
        a_s = self.align(self.proj_in(strong))
        return strong + self.proj_out(dfe_fuse(a_w, a_s, s.detach(), self.mlp)), s


class DFE(nn.Module):
    """DFE on the ``num_scales`` deepest encoder outputs (bottleneck included); None = every encoder scale."""

    def __init__(self, encoder_channels: Sequence[int], conv_op: type[nn.Module], num_scales: int | None = None):
        super().__init__()
        n = len(encoder_channels) if num_scales is None else num_scales
        if not 1 <= n <= len(encoder_channels):
            raise ValueError(f"DFE needs 1..{len(encoder_channels)} scales (the encoder's stages), got {num_scales}")
        self.scale_indices = list(range(len(encoder_channels) - n, len(encoder_channels)))
        self.scales = nn.ModuleList([DFEScale(encoder_channels[i], conv_op) for i in self.scale_indices])

    def forward(self, weak_skips: Sequence[torch.Tensor], strong_skips: Sequence[torch.Tensor]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Strong skips with the DFE scales enhanced; and the views' mean pooled similarity per sample (B,)."""
        out = list(strong_skips)
        sims = []
        for module, i in zip(self.scales, self.scale_indices):
            out[i], s = module(weak_skips[i], strong_skips[i])
            sims.append(s)
        return out, torch.stack(sims).mean(0)
