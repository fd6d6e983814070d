"""Known-answer tests for nnunetv2_sss.evaluation: hand-derived Dice/HD95/ASD, empty rules and the folder run."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial import cKDTree

from nnunetv2_sss.evaluation.metrics import (
    _surface,
    binary_metrics,
    case_metrics,
    evaluate_folders,
    image_diagonal,
    surface_distances,
)


def _square(shape: tuple[int, int], top: int, left: int, side: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[top:top + side, left:left + side] = True
    return m


def _write(arr: np.ndarray, path: Path, spacing_numpy_order: tuple[float, ...]) -> None:
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_numpy_order)))  # SimpleITK wants x, y(, z)
    sitk.WriteImage(img, str(path))


# ------------------------------------------------------------------------------------------- binary_metrics

def test_identical_masks() -> None:
    m = np.zeros((12, 14, 10), dtype=bool)
    m[3:9, 2:11, 4:8] = True
    m[5, 12, 5] = True  # a detached voxel: still zero distance to itself
    r = binary_metrics(m, m.copy(), (2.5, 0.7, 1.1))
    assert r == {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "empty": ""}


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_plate_shift_distances_are_k_times_spacing(axis: int) -> None:
    """Full-extent 1-voxel plates k apart along ``axis``: every surface distance is k * spacing[axis]."""
    spacing, k = (0.7, 2.0, 1.3), 3
    gt, pred = np.zeros((9, 10, 11), dtype=bool), np.zeros((9, 10, 11), dtype=bool)
    np.moveaxis(gt, axis, 0)[2] = True
    np.moveaxis(pred, axis, 0)[2 + k] = True
    r = binary_metrics(gt, pred, spacing)
    assert r["dice"] == 0.0
    assert r["hd95"] == pytest.approx(k * spacing[axis], abs=1e-12)
    assert r["asd"] == pytest.approx(k * spacing[axis], abs=1e-12)


@pytest.mark.parametrize("axis", [0, 1])
def test_square_shift_anisotropic_hand_derived(axis: int) -> None:
    """Side L=10 squares shifted by k=2 voxels along ``axis`` (spacing s=0.5 there, 1.5 across).

    Per direction, the 4L-4 = 36 surface distances are (s = shift-axis spacing; 1.5 >= k*s keeps it this simple):
      leading edge: L values k*s; trailing edge: 2 corners at 0, L-2 values k*s (the other square's edge is k*s
      away, its sides >= 1.5 away); each side: k-1 value(s) {1..k-1}*s, then L-1-k zeros.
    Union (72 values): 36 values k*s = 1.0 (half of the set, so HD95 = 1.0 whatever the interpolation) and
    ASD = [(2L-2)*k + k*(k-1)] * s / (4L-4) = (36 + 2) * 0.5 / 36. Dice = 2*(L-k)*L / (2*L*L) = 0.8.
    """
    L, k, s, s_across = 10, 2, 0.5, 1.5
    gt = _square((20, 20), 4, 5, L)
    pred = _square((20, 20), 4 + k, 5, L) if axis == 0 else _square((20, 20), 4, 5 + k, L)
    spacing = (s, s_across) if axis == 0 else (s_across, s)
    r = binary_metrics(gt, pred, spacing)
    assert r["dice"] == pytest.approx(0.8)
    assert r["hd95"] == pytest.approx(k * s)
    assert r["asd"] == pytest.approx(38 * 0.5 / 36)
    d = surface_distances(gt, pred, spacing)
    assert d.size == 2 * (4 * L - 4)
    assert np.count_nonzero(np.isclose(d, k * s)) == 36 and d.max() == pytest.approx(k * s)


def test_outlier_voxel_hd95_is_percentile_of_union() -> None:
    """Prediction = GT square + one stray voxel 6.5 mm from the GT surface.

    Union: 36 + 36 zeros and one 6.5, so n = 73: HD95 = 0 (the 95th percentile sits in the zeros; a max-based
    Hausdorff would say 6.5) and ASD = 6.5 / 73 (the mean of the two directed means would be 6.5 / 74).
    """
    gt = _square((20, 20), 4, 5, 10)
    pred = gt.copy()
    pred[18, 18] = True  # nearest GT surface voxel (13, 14): sqrt((5 * 0.5)^2 + (4 * 1.5)^2) = 6.5
    r = binary_metrics(gt, pred, (0.5, 1.5))
    assert r["hd95"] == 0.0
    assert r["asd"] == pytest.approx(6.5 / 73)
    assert surface_distances(gt, pred, (0.5, 1.5)).max() == pytest.approx(6.5)
    assert r["dice"] == pytest.approx(200 / 201)


def test_concentric_spheres() -> None:
    """Spheres of radius 8 and 11 mm on an anisotropic grid: surface distances ~3 mm, up to a voxel of error."""
    spacing = np.array([1.2, 0.9, 1.0])
    shape = (26, 34, 30)
    grids = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * sp for n, sp in zip(shape, spacing, strict=True)],
                        indexing="ij")
    r = np.sqrt(sum(g ** 2 for g in grids))
    r1, r2 = 8.0, 11.0
    res = binary_metrics(r <= r1, r <= r2, spacing)
    assert res["hd95"] == pytest.approx(r2 - r1, abs=spacing.max())
    assert res["asd"] == pytest.approx(r2 - r1, abs=spacing.max())
    assert res["hd95"] >= res["asd"]
    assert res["dice"] == pytest.approx(2 * r1 ** 3 / (r1 ** 3 + r2 ** 3), abs=0.03)
    # Swapping GT and prediction must not change a symmetric metric.
    swapped = binary_metrics(r <= r2, r <= r1, spacing)
    assert swapped["hd95"] == pytest.approx(res["hd95"]) and swapped["asd"] == pytest.approx(res["asd"])


def test_surface_distances_match_brute_force_kdtree() -> None:
    """Cropping + EDT with sampling must equal nearest-neighbour distances between physical surface points."""
    rng = np.random.default_rng(0)
    spacing = np.array([2.0, 0.6, 1.3])
    a = rng.random((14, 18, 16)) > 0.8
    b = rng.random((14, 18, 16)) > 0.85
    a[:, :, :3] = False  # leave background margins so the crop really crops
    b[-4:] = False
    pa = np.argwhere(_surface(a)) * spacing
    pb = np.argwhere(_surface(b)) * spacing
    expected = np.concatenate([cKDTree(pb).query(pa)[0], cKDTree(pa).query(pb)[0]])
    got = surface_distances(a, b, spacing)
    np.testing.assert_allclose(np.sort(got), np.sort(expected), atol=1e-9)


def test_surface_counts_image_border() -> None:
    m = np.ones((4, 5), dtype=bool)
    assert _surface(m).sum() == 4 * 5 - 2 * 3  # only the inner 2x3 block is not surface


def test_empty_prediction_gets_diagonal_penalty() -> None:
    gt = _square((10, 20), 2, 2, 4)
    spacing = (2.0, 0.5)
    diag = np.sqrt((10 * 2.0) ** 2 + (20 * 0.5) ** 2)
    r = binary_metrics(gt, np.zeros_like(gt), spacing)
    assert r == {"dice": 0.0, "hd95": pytest.approx(diag), "asd": pytest.approx(diag), "empty": "pred_empty"}
    r = binary_metrics(np.zeros_like(gt), gt, spacing)
    assert r["dice"] == 0.0 and r["hd95"] == pytest.approx(diag) and r["empty"] == "gt_empty"
    assert image_diagonal((10, 20), spacing) == pytest.approx(diag)


def test_both_empty() -> None:
    z = np.zeros((6, 7, 8), dtype=bool)
    assert binary_metrics(z, z, (1.0, 2.0, 3.0)) == {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "empty": "both_empty"}


def test_singleton_axis_scored_as_2d() -> None:
    """A 2D slice stored as (1, H, W) with nnU-Net's fake spacing 999 scores exactly like the 2D image."""
    gt, pred = _square((20, 20), 4, 5, 10), _square((20, 20), 6, 5, 10)
    r2d = binary_metrics(gt, pred, (0.5, 1.5))
    r3d = binary_metrics(gt[None], pred[None], (999.0, 0.5, 1.5))
    assert r3d == r2d
    empty = binary_metrics(gt[None], np.zeros_like(gt[None]), (999.0, 0.5, 1.5))
    assert empty["hd95"] == pytest.approx(np.hypot(20 * 0.5, 20 * 1.5))


def test_binary_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(np.zeros((3, 4), bool), np.zeros((4, 3), bool), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(np.zeros((3, 4), bool), np.zeros((3, 4), bool), (1.0, 1.0, 1.0))


# ------------------------------------------------------------------------------------------- case_metrics

def test_case_metrics_labels_regions_and_ignore() -> None:
    gt = np.zeros((20, 20), dtype=np.uint8)
    gt[4:14, 5:15] = 1
    gt[15:18, 15:18] = 2
    gt[0:2, 0:2] = 9  # ignore label
    pred = np.zeros_like(gt)
    pred[6:16, 5:15] = 1
    pred[0:2, 0:2] = 1  # inside the ignore area: must not count
    rows = case_metrics(gt, pred, (0.5, 1.5), [1, 2, (1, 2)], ignore_label=9)
    by = {r["class"]: r for r in rows}
    assert list(by) == ["1", "2", "(1, 2)"]
    assert by["1"]["dice"] == pytest.approx(0.8) and by["1"]["hd95"] == pytest.approx(1.0)
    assert (by["1"]["gt_voxels"], by["1"]["pred_voxels"]) == (100, 100)
    assert by["2"]["empty"] == "pred_empty" and by["2"]["dice"] == 0.0
    assert by["(1, 2)"]["gt_voxels"] == 109 and by["(1, 2)"]["dice"] == pytest.approx(160 / 209)


# ------------------------------------------------------------------------------------------- folders

@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Three 2D cases (spacing 0.5 x 1.5 in numpy order): shifted square, identical, empty prediction for label 2."""
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    sp = (0.5, 1.5)
    base = np.zeros((20, 20), dtype=np.uint8)
    base[4:14, 5:15] = 1
    shifted = np.zeros_like(base)
    shifted[6:16, 5:15] = 1
    two = base.copy()
    two[16:19, 1:4] = 2
    for name, g, p in (("case_a", base, shifted), ("case_b", base, base), ("case_c", two, base)):
        _write(g, gt_dir / f"{name}.nii.gz", sp)
        _write(p, pred_dir / f"{name}.nii.gz", sp)
    (pred_dir / "dataset.json").write_text("{}")  # nnU-Net leaves these in prediction folders
    return gt_dir, pred_dir


def test_evaluate_folders_outputs(folders: tuple[Path, Path]) -> None:
    gt_dir, pred_dir = folders
    summary = evaluate_folders(gt_dir, pred_dir, num_processes=2)
    out = pred_dir / "sss_evaluation"
    with (out / "per_case.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["class"]) for r in rows] == [(c, k) for c in ("case_a", "case_b", "case_c")
                                                      for k in ("1", "2")]
    a1 = rows[0]
    # spacing came from the files in the right axis order: the 2-row shift is along the 0.5 axis
    assert float(a1["dice"]) == pytest.approx(0.8) and float(a1["hd95"]) == pytest.approx(1.0)
    assert float(a1["asd"]) == pytest.approx(38 * 0.5 / 36)
    assert (a1["gt_voxels"], a1["pred_voxels"], a1["empty"]) == ("100", "100", "")
    assert rows[1]["empty"] == "both_empty" and float(rows[1]["dice"]) == 1.0
    c2 = rows[5]
    assert c2["empty"] == "pred_empty" and float(c2["hd95"]) == pytest.approx(np.hypot(20 * 0.5, 20 * 1.5))

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert {"n_cases", "per_class", "foreground_mean", "empty_rules", "units", "definitions"} <= set(summary)
    assert summary["n_cases"] == 3 and summary["labels"] == ["1", "2"]
    d1 = summary["per_class"]["1"]["dice"]
    assert d1["mean"] == pytest.approx((0.8 + 1 + 1) / 3) and d1["median"] == 1.0
    assert d1["std"] == pytest.approx(np.std([0.8, 1, 1]))
    assert summary["per_class"]["2"]["n_both_empty"] == 2 and summary["per_class"]["2"]["n_pred_empty"] == 1
    assert summary["foreground_mean"]["dice"] == pytest.approx((d1["mean"] + 2 / 3) / 2)
    assert (out / "boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["boxplot.png", "per_case.csv", "summary.json"]  # no tmp left


def test_evaluate_folders_dataset_json_and_label_override(folders: tuple[Path, Path], tmp_path: Path) -> None:
    gt_dir, pred_dir = folders
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"labels": {"background": 0, "LV": 1, "RV": 2}, "file_ending": ".nii.gz"}))
    s = evaluate_folders(gt_dir, pred_dir, out_dir=tmp_path / "o1", dataset_json=ds)
    assert s["per_class"]["1"]["name"] == "LV" and s["per_class"]["2"]["name"] == "RV"
    s = evaluate_folders(gt_dir, pred_dir, out_dir=tmp_path / "o2", dataset_json=ds, labels=[2])
    assert list(s["per_class"]) == ["2"] and s["per_class"]["2"]["name"] == "RV"


def test_missing_prediction(folders: tuple[Path, Path], tmp_path: Path) -> None:
    gt_dir, pred_dir = folders
    (pred_dir / "case_b.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_b.nii.gz"):
        evaluate_folders(gt_dir, pred_dir, out_dir=tmp_path / "o")
    with pytest.warns(UserWarning, match="case_b"):
        s = evaluate_folders(gt_dir, pred_dir, out_dir=tmp_path / "o", allow_missing=True)
    assert s["n_cases"] == 2 and s["skipped_missing_predictions"] == ["case_b.nii.gz"]


def test_shape_and_spacing_mismatch(folders: tuple[Path, Path], tmp_path: Path) -> None:
    gt_dir, pred_dir = folders
    _write(np.zeros((20, 21), np.uint8), pred_dir / "case_c.nii.gz", (0.5, 1.5))
    with pytest.raises(ValueError, match=r"Shape mismatch for case_c\.nii\.gz"):
        evaluate_folders(gt_dir, pred_dir, out_dir=tmp_path / "o")
    _write(np.zeros((20, 20), np.uint8), pred_dir / "case_c.nii.gz", (0.5, 1.0))
    with pytest.raises(ValueError, match=r"Spacing mismatch for case_c\.nii\.gz"):
        evaluate_folders(gt_dir, pred_dir, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_entry(folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    from nnunetv2_sss.cli import evaluate_entry

    gt_dir, pred_dir = folders
    out = tmp_path / "cli_out"
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_sss_evaluate", str(gt_dir), str(pred_dir), "-o", str(out),
                                      "--labels", "1"])
    evaluate_entry()
    assert json.loads((out / "summary.json").read_text())["labels"] == ["1"]
    assert "foreground mean" in capsys.readouterr().out
