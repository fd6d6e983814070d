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
