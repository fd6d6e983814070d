"""Checkpoints that are never half-written and never resumed without their semi-supervised state.

nnU-Net's own ``save_checkpoint`` writes straight to the final name: a kill during the write leaves a truncated
file and the previous checkpoint is gone. The trainers of this package serialise nnU-Net's checkpoint to memory,
add their state (DFE, EMA teacher, step counter) under ``sss_state``, and write the whole thing once, to a
temporary name that is fsync'ed and renamed. On resume, an unreadable checkpoint or one without ``sss_state``
is skipped with a warning in favour of the newest complete one; when there is none, a clear error is raised.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch
from torch import distributed as dist

from nnunetv2_sss.files import atomic_torch_save

SSS_STATE_KEY = "sss_state"
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


class CheckpointError(RuntimeError):
    """No checkpoint this trainer can resume from; the message says which files were tried and what to do."""


def save_complete_checkpoint(filename: str | Path, nnunet_save: Callable[[object], None], sss_state: dict) -> None:
    """nnU-Net's checkpoint (``nnunet_save`` serialises it to the buffer it is given) plus ``sss_state``, written
    atomically in one piece."""
    buffer = io.BytesIO()
    nnunet_save(buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=False)
    checkpoint[SSS_STATE_KEY] = sss_state
    atomic_torch_save(checkpoint, filename)


def _try_load(path: Path) -> tuple[dict | None, str]:
    """(checkpoint, '') or (None, why it cannot be used)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated files raise EOFError, RuntimeError, UnpicklingError, ...
        return None, f"unreadable ({type(e).__name__}: {str(e)[:120]})"
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        return None, "not an nnU-Net checkpoint"
    if SSS_STATE_KEY not in checkpoint:
        return None, (f"no '{SSS_STATE_KEY}' (DFE, EMA teacher and step counter would silently restart; written by "
                      f"a stock nnU-Net trainer or an older version)")
    return checkpoint, ""


def resolve_resume_checkpoint(requested: str | Path, warn: Callable[[str], None]) -> tuple[Path, dict]:
    """The requested checkpoint if it is readable and complete, else the newest complete one in its folder
    (by epoch, then modification time) with a warning; CheckpointError when there is none."""
    requested = Path(requested)
    checkpoint, why = _try_load(requested)
    if checkpoint is not None:
        return requested, checkpoint
    problems = [f"{requested.name}: {why}"]
    usable: list[tuple[int, float, Path, dict]] = []
    for name in CHECKPOINT_NAMES:
        p = requested.parent / name
        if p == requested or not p.is_file():
            continue
        c, why_c = _try_load(p)
        if c is None:
            problems.append(f"{name}: {why_c}")
        else:
            usable.append((int(c.get("current_epoch", 0)), p.stat().st_mtime, p, c))
    if not usable:
        raise CheckpointError(
            f"Cannot resume from {requested.parent}: no complete checkpoint of this semi-supervised trainer ("
            + "; ".join(problems) + "). Start a new run (without --c), or start from the network weights only with "
            f"-pretrained_weights {requested}.")
    _, _, path, checkpoint = max(usable, key=lambda u: (u[0], u[1]))
    warn(f"WARNING: {requested} cannot be used ({why}); resuming from {path} (epoch {checkpoint.get('current_epoch')}) "
         f"instead.")
    return path, checkpoint


class CompleteCheckpointMixin:
    """For nnUNetTrainer subclasses with state outside the network: ``extra_checkpoint_state()`` is saved with
    nnU-Net's checkpoint under ``sss_state``, in one atomic write, and a resume needs it back."""

    def extra_checkpoint_state(self) -> dict:
        return self.semi_state.state_dict()

    def load_extra_checkpoint_state(self, state: dict) -> None:
        self.semi_state.load_state_dict(state)

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


def backward_and_step(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                      grad_scaler, is_ddp: bool) -> None:
    """nnU-Net's backward/clip(12)/step (with its AMP scaler when there is one), plus the cross-rank gradient
    average that DDP's hooks would do: the semi-supervised step calls encoder and decoder directly, bypassing them."""
    if grad_scaler is not None:
        grad_scaler.scale(loss).backward()
        _average_gradients_across_ranks(params, is_ddp)
        grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 12)
        grad_scaler.step(optimizer)
        grad_scaler.update()
    else:
        loss.backward()
        _average_gradients_across_ranks(params, is_ddp)
        torch.nn.utils.clip_grad_norm_(params, 12)
        optimizer.step()


def _average_gradients_across_ranks(params: list[torch.nn.Parameter], is_ddp: bool) -> None:
    if not is_ddp:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
