"""``scripts/class_confusion.py``: where each class's voxels go, on a case whose answer is counted by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import class_confusion as cc  # noqa: E402


def _write(folder: Path, name: str, a: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(a.astype(np.uint8)), str(folder / name))


def test_shares_of_each_class_against_a_hand_count(tmp_path: Path) -> None:
    gt = np.zeros((1, 4, 10), np.uint8)
    gt[0, 0, :] = 1  # 10 voxels of class 1
    gt[0, 1, :5] = 2  # 5 voxels of class 2
    pred = gt.copy()
    pred[0, 0, :2] = 0  # class 1: 2 lost to background
    pred[0, 0, 2] = 2  # 1 confused with class 2
    pred[0, 3, :4] = 1  # 4 background voxels predicted as class 1
    _write(tmp_path / "gt", "a.nii.gz", gt)
    _write(tmp_path / "pred", "a.nii.gz", pred)
    s = cc.shares(cc.confusion(tmp_path / "gt", tmp_path / "pred", 3))
    one, two = s["1"], s["2"]
    assert one["recall"] == pytest.approx(0.7)
    assert one["missed_as_background"] == pytest.approx(0.2) and one["missed_as_other_class"] == pytest.approx(0.1)
    assert one["predicted_on_background"] == pytest.approx(4 / 11) and one["predicted_on_other_class"] == 0
    assert two["recall"] == 1 and two["predicted_on_other_class"] == pytest.approx(1 / 6)


def test_missing_prediction_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "gt", "a.nii.gz", np.zeros((1, 2, 2)))
    (tmp_path / "pred").mkdir()
    with pytest.raises(FileNotFoundError, match="No prediction in .* for 1 GT case\\(s\\): a.nii.gz"):
        cc.confusion(tmp_path / "gt", tmp_path / "pred", 3)
