"""``scripts/teacher_weights.py``: the teacher's checkpoint is the stock checkpoint with the teacher as the network,
and a run without a teacher is refused with the reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import teacher_weights as tw  # noqa: E402


def _checkpoint(fold: Path, teacher: dict | None) -> None:
    fold.mkdir(parents=True)
    ck = {"network_weights": {"w": torch.zeros(2), "b": torch.zeros(1)}, "current_epoch": 7,
          "sss_state": {"sss_step": 3, "ema_teacher": teacher}}
    torch.save(ck, fold / "checkpoint_final.pth")


def test_teacher_becomes_the_network_and_the_rest_is_kept(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "fold_all", {"w": torch.ones(2), "b": torch.full((1,), 2.0)})
    out = tw.write_teacher_checkpoint(tmp_path / "fold_all")
    ck = torch.load(out, weights_only=False)
    assert out.name == tw.TEACHER_CHECKPOINT
    assert torch.equal(ck["network_weights"]["w"], torch.ones(2))
    assert torch.equal(ck["network_weights"]["b"], torch.full((1,), 2.0))
    assert ck["current_epoch"] == 7
    original = torch.load(tmp_path / "fold_all" / "checkpoint_final.pth", weights_only=False)
    assert torch.equal(original["network_weights"]["w"], torch.zeros(2))  # the student's checkpoint is untouched


def test_run_without_teacher_is_refused(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "fold_all", None)
    with pytest.raises(SystemExit, match="has no EMA teacher"):
        tw.write_teacher_checkpoint(tmp_path / "fold_all")


def test_teacher_with_other_parameter_names_is_refused(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "fold_all", {"w": torch.ones(2)})
    with pytest.raises(SystemExit, match="parameter names differ"):
        tw.write_teacher_checkpoint(tmp_path / "fold_all")
