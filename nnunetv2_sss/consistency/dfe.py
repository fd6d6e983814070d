"""Discriminative Feature Enhancement (DFE), our reading of SSS (Zhu et al. 2025, Sec. 4.2).

For a feature scale, weak-view and strong-view features are projected (one 1x1 conv each) and aligned by one
shared 3x3 conv (A_w, A_s). Their global-average-pooled vectors give a cosine similarity s per sample; w =
sigmoid(s) weights a fusion of the two after a per-pixel MLP, and the discrepancy (A_s - A_w) is added back in
proportion to how dissimilar the views are (1 - s), so the decoder sees what the strong perturbation changed.
A 1x1 conv projects back to the scale's channel count. DFE is training-only: it lives outside the network, so
nnU-Net's inference never sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def pooled_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the global-average-pooled features, one value per sample: (B,)."""
    axes = list(range(2, a.dim()))
    return F.cosine_similarity(a.mean(axes), b.mean(axes), dim=1, eps=1e-6)


def dfe_fuse(a_w: torch.Tensor, a_s: torch.Tensor, mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """adjusted = w*MLP(A_w) + (1-w)*MLP(A_s) + (1-s)*(A_s - A_w) with s = pooled cosine, w = sigmoid(s)."""
    s = pooled_cosine(a_w, a_s)
    shape = (-1,) + (1,) * (a_w.dim() - 1)
    w = torch.sigmoid(s).view(shape)
    fused = w * mlp(a_w) + (1 - w) * mlp(a_s)
    return fused + (1 - s).view(shape) * (a_s - a_w), s


class DFEScale(nn.Module):
    """DFE at one feature scale (2D or 3D, following the network's conv op)."""

    def __init__(self, channels: int, conv_op: type[nn.Module], hidden_channels: int | None = None):
        super().__init__()
        c = hidden_channels or channels
        self.proj_weak = conv_op(channels, c, kernel_size=1)
        self.proj_strong = conv_op(channels, c, kernel_size=1)
        self.align = conv_op(c, c, kernel_size=3, padding=1)  # shared by both views
        self.mlp = nn.Sequential(conv_op(c, 2 * c, kernel_size=1), nn.GELU(), conv_op(2 * c, c, kernel_size=1))
        self.proj_out = conv_op(c, channels, kernel_size=1)

    def forward(self, weak: torch.Tensor, strong: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a_w = self.align(self.proj_weak(weak))
        a_s = self.align(self.proj_strong(strong))
        adjusted, s = dfe_fuse(a_w, a_s, self.mlp)
        return self.proj_out(adjusted), s


class DFE(nn.Module):
    """DFE on the ``num_scales`` deepest encoder outputs (bottleneck included), where features are compact."""

    def __init__(self, encoder_channels: Sequence[int], conv_op: type[nn.Module], num_scales: int = 3):
        super().__init__()
        if num_scales > len(encoder_channels):
            raise ValueError(f"DFE needs {num_scales} scales but the encoder has {len(encoder_channels)} stages")
        self.scale_indices = list(range(len(encoder_channels) - num_scales, len(encoder_channels)))
        self.scales = nn.ModuleList([DFEScale(encoder_channels[i], conv_op) for i in self.scale_indices])

    def forward(self, weak_skips: Sequence[torch.Tensor], strong_skips: Sequence[torch.Tensor]
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Strong skips with the DFE scales replaced by adjusted features; and the mean similarity (B,)."""
        out = list(strong_skips)
        sims = []
        for module, i in zip(self.scales, self.scale_indices):
            out[i], s = module(weak_skips[i], strong_skips[i])
            sims.append(s)
        return out, torch.stack(sims).mean(0)
