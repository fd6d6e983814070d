"""EMA teacher (UniMatch V2 style): a slowly moving copy of the student that makes the pseudo-labels."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_momentum(step: int, max_momentum: float = 0.996) -> float:
    """min(1 - 1/(step+1), max): the teacher follows the student closely at first, then slowly."""
    return min(1.0 - 1.0 / (step + 1), max_momentum)


class EMATeacher:
    """Keeps ``teacher = m * teacher + (1 - m) * student`` for parameters; buffers are copied."""

    def __init__(self, student: nn.Module, max_momentum: float = 0.996):
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.model.eval()
        self.max_momentum = max_momentum

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        m = ema_momentum(step, self.max_momentum)
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1 - m)
        for t, s in zip(self.model.buffers(), student.buffers()):
            t.copy_(s)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
