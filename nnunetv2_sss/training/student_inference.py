"""Student inference for the SAM-2 refresh: the trainer's live network through nnU-Net's own predictor.

This lives in the training layer so that ``nnunetv2_sss.sam`` never reaches into a trainer: the refresh
(``sam/refresh.py``) receives a plain callable ``predict(identifier, data (C_in, Z, Y, X)) -> softmax (C, Z, Y, X)``
made here by ``student_predict_fn`` and sees only numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from nnunetv2_sss.evaluation.prediction import nnunet_predictor
from nnunetv2_sss.training.warm_start import unwrap_network

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

PredictFn = Callable[[str, np.ndarray], np.ndarray]


def _inference_network(trainer: nnUNetTrainer) -> torch.nn.Module:
    """The network the predictor should run: never the DDP wrapper (only rank 0 predicts; DDP's forward syncs)."""
    return trainer.network.module if getattr(trainer, "is_ddp", False) else trainer.network


@contextmanager
def student_inference(trainer: nnUNetTrainer) -> Iterator[None]:
    """Deep supervision off and eval mode while predicting; both restored exactly afterwards."""
    net = unwrap_network(trainer.network)
    was_training = trainer.network.training
    ds_before = getattr(net.decoder, "deep_supervision", None)
    trainer.set_deep_supervision_enabled(False)
    try:
        yield
    finally:
        if ds_before is not None:
            trainer.set_deep_supervision_enabled(ds_before)
        trainer.network.train(was_training)


def make_student_predictor(trainer: nnUNetTrainer, use_mirroring: bool = False,
                           tile_step_size: float = 0.5) -> nnUNetPredictor:
    """nnU-Net's predictor around the trainer's live network, initialised as ``perform_actual_validation`` does."""
    predictor = nnunet_predictor(trainer.device, use_mirroring, tile_step_size)
    predictor.manual_initialization(_inference_network(trainer), trainer.plans_manager, trainer.configuration_manager,
                                    None, trainer.dataset_json, trainer.__class__.__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def predict_volume(trainer: nnUNetTrainer, data: np.ndarray | torch.Tensor, use_mirroring: bool = False,
                   tile_step_size: float = 0.5, predictor: nnUNetPredictor | None = None) -> np.ndarray:
    """Student softmax (C, Z, Y, X) float32 of one whole preprocessed case (C_in, Z, Y, X).

    Mirroring is off by default: the refresh runs often and TTA costs 2^axes forward passes. Pass a ``predictor``
    from ``make_student_predictor`` to reuse it across cases.
    """
    if trainer.label_manager.has_regions:
        raise ValueError("SAM-2 pseudo-labels need a label-based dataset; region-based training is not supported")
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(data, dtype=np.float32))) if not torch.is_tensor(data) \
        else data.float()
    if predictor is None:
        predictor = make_student_predictor(trainer, use_mirroring, tile_step_size)
    with student_inference(trainer), torch.no_grad():
        logits = predictor.predict_sliding_window_return_logits(x)
        probs = trainer.label_manager.apply_inference_nonlin(logits.float())
    return probs.cpu().numpy().astype(np.float32, copy=False)


@contextmanager
def student_predict_fn(trainer: nnUNetTrainer, use_mirroring: bool = False) -> Iterator[PredictFn]:
    """The predict callable the SAM-2 refresh takes, valid inside the ``with`` block (eval mode, no deep
    supervision; the trainer's state is restored on exit). One predictor is reused for all cases."""
    predictor = make_student_predictor(trainer, use_mirroring)
    with student_inference(trainer):
        yield lambda _identifier, data: predict_volume(trainer, data, predictor=predictor)
