"""What a semi-supervised run carries besides nnU-Net's network and optimizer, with its checkpoint state.

DFE, the EMA teacher, the class-adaptive thresholds and the step counter live outside the network (so
``nnUNetv2_predict`` never sees them) and are saved under the checkpoint's ``sss_state`` key; a resumed run
continues them instead of silently restarting them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import distributed as dist
from torch import nn

from nnunetv2_sss.consistency.dfe import DFE
from nnunetv2_sss.consistency.ema import EMATeacher
from nnunetv2_sss.consistency.losses import ClassAdaptiveThreshold


@dataclass
class SemiSupervisedState:
    step: int = 0
    dfe: DFE | None = None
    ema_teacher: EMATeacher | None = None
    adaptive_threshold: ClassAdaptiveThreshold | None = None

    @classmethod
    def build(cls, network: nn.Module, device: torch.device, use_dfe: bool, dfe_num_scales: int | None,
              use_ema_teacher: bool, ema_max_momentum: float, adaptive_threshold: ClassAdaptiveThreshold | None,
              is_ddp: bool) -> SemiSupervisedState:
        """Made from the network as it is after ``initialize()`` (a warm start has loaded its weights by then): the
        teacher starts as that network, DFE (outside DDP) from rank 0's random weights on every rank."""
        dfe = None
        if use_dfe:
            dfe = DFE(network.encoder.output_channels, network.encoder.conv_op, dfe_num_scales).to(device)
            if is_ddp:
                for p in dfe.parameters():
                    dist.broadcast(p.data, src=0)
        teacher = EMATeacher(network, ema_max_momentum) if use_ema_teacher else None
        return cls(0, dfe, teacher, adaptive_threshold)

    def state_dict(self) -> dict:
        state = {"sss_step": self.step}
        if self.dfe is not None:
            state["dfe"] = self.dfe.state_dict()
        if self.ema_teacher is not None:
            state["ema_teacher"] = self.ema_teacher.state_dict()
        if self.adaptive_threshold is not None:
            state["class_mean_confidence"] = self.adaptive_threshold.mean_conf.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state.get("sss_step", 0)
        if self.dfe is not None and "dfe" in state:
            self.dfe.load_state_dict(state["dfe"])
        if self.ema_teacher is not None and "ema_teacher" in state:
            self.ema_teacher.load_state_dict(state["ema_teacher"])
        if self.adaptive_threshold is not None and "class_mean_confidence" in state:
            self.adaptive_threshold.mean_conf = state["class_mean_confidence"].clone().cpu()
