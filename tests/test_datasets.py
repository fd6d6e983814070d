"""Dataset tools: the synthetic dataset, label budgets and the ACDC converter (real data via ``acdc_dir``)."""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_sss import cli
from nnunetv2_sss.datasets.acdc import convert_acdc, parse_labeled
from nnunetv2_sss.datasets.label_budget import DatasetToolError, make_label_budget
from nnunetv2_sss.datasets.synthetic import make_synthetic_dataset


def _ids(folder: Path, with_channel: bool = True) -> list[str]:
    """Case ids of a folder of .nii.gz files (channel suffix stripped for image folders)."""
    names = [p.name[: -len(".nii.gz")] for p in folder.iterdir() if p.name.endswith(".nii.gz")]
    return sorted({n[:-5] if with_channel else n for n in names})


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _no_leftovers(raw: Path) -> None:
    """Nothing half-written: no hidden staging folders beside the datasets."""
    assert [p.name for p in raw.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_structure_labels_and_spacing(nnunet_dirs: dict[str, Path]) -> None:
    out = make_synthetic_dataset()
    raw = nnunet_dirs["nnUNet_raw"]
    assert out == raw / "Dataset990_SSSSynthetic"
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "imagesUnlabeled",
                                                    "labelsTr", "labelsTs"]
    _no_leftovers(raw)
    assert len(_ids(out / "imagesTr")) == 6 and _ids(out / "imagesTr") == _ids(out / "labelsTr", False)
    assert len(_ids(out / "imagesTs")) == 6 and _ids(out / "imagesTs") == _ids(out / "labelsTs", False)
    assert len(_ids(out / "imagesUnlabeled")) == 16
    assert all(p.name.endswith("_0000.nii.gz") for p in (out / "imagesUnlabeled").iterdir())
    assert not set(_ids(out / "imagesUnlabeled")) & set(_ids(out / "imagesTr"))
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["numTraining"] == 6 and dj["file_ending"] == ".nii.gz"
    assert dj["channel_names"] == {"0": "MRI"}
    assert dj["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}

    empty_apex = 0
    for case in _ids(out / "imagesTr"):
        img = sitk.ReadImage(str(out / "imagesTr" / f"{case}_0000.nii.gz"))
        seg = sitk.ReadImage(str(out / "labelsTr" / f"{case}.nii.gz"))
        assert img.GetSpacing() == pytest.approx((1.5, 1.5, 5.0))  # SimpleITK order x, y, z
        assert seg.GetSpacing() == pytest.approx((1.5, 1.5, 5.0))
        a, s = sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(seg)
        assert a.shape == s.shape == (6, 64, 64) and a.dtype == np.float32 and s.dtype == np.uint8
        assert set(np.unique(s).tolist()) == {0, 1, 2, 3}
        # the heart shrinks towards the apex and the RV ends before it
        areas = (s > 0).sum(axis=(1, 2))
        assert areas[0] > areas[-1] and np.all(np.diff(areas) <= 0)
        assert (s[-1] == 1).sum() == 0
        empty_apex += int(areas[-1] == 0)
        # classes are told apart by intensity: cavity brighter than its ring
        assert a[s == 3].mean() > 2 * a[s == 2].mean()
    assert 0 < empty_apex < 6


def test_synthetic_is_deterministic_per_seed(nnunet_dirs: dict[str, Path]) -> None:
    kw = dict(n_labeled=2, n_unlabeled=1, n_test=1, shape=(3, 32, 32))
    a = make_synthetic_dataset(901, "A", seed=5, **kw)
    b = make_synthetic_dataset(902, "B", seed=5, **kw)
    c = make_synthetic_dataset(903, "C", seed=6, **kw)
    d = make_synthetic_dataset(904, "D", seed=5, n_labeled=2, n_unlabeled=3, n_test=0, shape=(3, 32, 32))
    for rel in ("imagesTr/syn_tr001_0000.nii.gz", "labelsTr/syn_tr001.nii.gz", "imagesUnlabeled/syn_un000_0000.nii.gz",
                "imagesTs/syn_ts000_0000.nii.gz"):
        np.testing.assert_array_equal(_read(a / rel), _read(b / rel))
    assert not np.array_equal(_read(a / "imagesTr/syn_tr000_0000.nii.gz"), _read(c / "imagesTr/syn_tr000_0000.nii.gz"))
    # other counts leave existing cases unchanged
    np.testing.assert_array_equal(_read(a / "labelsTr/syn_tr000.nii.gz"), _read(d / "labelsTr/syn_tr000.nii.gz"))
    assert not (d / "imagesTs").exists()


def test_synthetic_refuses_existing_id_unless_overwrite(nnunet_dirs: dict[str, Path]) -> None:
    kw = dict(n_unlabeled=0, n_test=0, shape=(2, 16, 16))
    out = make_synthetic_dataset(905, "First", n_labeled=1, **kw)
    with pytest.raises(DatasetToolError, match=r"Dataset905_First.*overwrite"):
        make_synthetic_dataset(905, "Second", n_labeled=2, **kw)
    assert out.is_dir() and not (out.parent / "Dataset905_Second").exists()
    new = make_synthetic_dataset(905, "Second", n_labeled=2, overwrite=True, **kw)
    assert not out.exists() and len(_ids(new / "imagesTr")) == 2
    _no_leftovers(nnunet_dirs["nnUNet_raw"])
    with pytest.raises(DatasetToolError, match="n_labeled"):
        make_synthetic_dataset(906, n_labeled=0)
    with pytest.raises(DatasetToolError, match="not usable in a folder name"):
        make_synthetic_dataset(906, "bad name")


def test_synthetic_cli(nnunet_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_sss_make_synthetic", "-d", "907", "--n_labeled", "2", "--n_unlabeled",
                                      "1", "--n_test", "0", "--shape", "2", "16", "16", "--seed", "3"])
    cli.make_synthetic_entry()
    out = nnunet_dirs["nnUNet_raw"] / "Dataset907_SSSSynthetic"
    assert str(out) in capsys.readouterr().out
    assert len(_ids(out / "imagesTr")) == 2 and len(_ids(out / "imagesUnlabeled")) == 1
    with pytest.raises(SystemExit) as e:  # exists already: a clean error, not a traceback
        cli.make_synthetic_entry()
    assert e.value.code == 1 and "overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- label budget

PATIENTS = [f"patient{i:03d}" for i in range(1, 6)]


@pytest.fixture
def grouped_source(nnunet_dirs: dict[str, Path]) -> Path:
    """Dataset500_Grouped: 5 patients x 2 frames, 2 channels, plus 1 unlabeled case and 1 test case."""
    root = nnunet_dirs["nnUNet_raw"] / "Dataset500_Grouped"
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", "imagesUnlabeled"):
        (root / sub).mkdir(parents=True)

    def write(arr: np.ndarray, path: Path) -> None:
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))

    def case(folder: str, name: str, label_folder: str | None) -> None:
        for c in range(2):
            write(rng.random((2, 4, 4)).astype(np.float32), root / folder / f"{name}_{c:04d}.nii.gz")
        if label_folder:
            write(rng.integers(0, 3, (2, 4, 4)).astype(np.uint8), root / label_folder / f"{name}.nii.gz")

    for p in PATIENTS:
        for f in ("frame01", "frame02"):
            case("imagesTr", f"{p}_{f}", "labelsTr")
    case("imagesUnlabeled", "extra001", None)
    case("imagesTs", "test001", "labelsTs")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 10,
        "file_ending": ".nii.gz", "description": "kept"}))
    return root


def _patients(ids: list[str]) -> set[str]:
    return {i.split("_")[0] for i in ids}


def test_budget_by_n_copies_files_and_records(grouped_source: Path) -> None:
    out = make_label_budget(500, 501, n=3, seed=1)
    assert out.name == "Dataset501_Grouped_3cases"
    labeled = _ids(out / "imagesTr")
    assert len(labeled) == 3 and labeled == _ids(out / "labelsTr", False)
    unlabeled = _ids(out / "imagesUnlabeled")
    assert sorted(labeled + unlabeled) == sorted(_ids(grouped_source / "imagesTr") + ["extra001"])
    for case in unlabeled:  # all channels, identical bytes, never a label
        for c in range(2):
            src = grouped_source / ("imagesUnlabeled" if case == "extra001" else "imagesTr") / f"{case}_{c:04d}.nii.gz"
            assert filecmp.cmp(src, out / "imagesUnlabeled" / f"{case}_{c:04d}.nii.gz", shallow=False)
    assert not (out / "labelsUnlabeled").exists()
    assert filecmp.cmp(grouped_source / "labelsTs/test001.nii.gz", out / "labelsTs/test001.nii.gz", shallow=False)
    assert (out / "imagesTs/test001_0001.nii.gz").is_file()
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["numTraining"] == 3 and dj["description"] == "kept" and dj["channel_names"] == {"0": "T1", "1": "T2"}
    record = json.loads((out / "label_budget.json").read_text())
    assert record["source"] == "Dataset500_Grouped" and record["seed"] == 1
    assert record["selection"]["n"] == 3 and record["labeled_cases"] == labeled
    assert record["source_unlabeled_cases"] == ["extra001"]
    # same seed, same choice; some other seed chooses differently
    assert _ids(make_label_budget("Dataset500_Grouped", 502, n=3, seed=1) / "imagesTr") == labeled
    others = [_ids(make_label_budget(500, 503, n=3, seed=s, overwrite=True) / "imagesTr") for s in (2, 3, 4)]
    assert any(o != labeled for o in others)
    _no_leftovers(grouped_source.parent)


def test_budget_group_regex_keeps_patients_together(grouped_source: Path) -> None:
    for seed in range(4):
        out = make_label_budget(500, 510 + seed, n=2, group_regex=r"(patient\d+)", seed=seed)
        labeled, unlabeled = _ids(out / "imagesTr"), _ids(out / "imagesUnlabeled")
        assert len(labeled) == 4 and len(_patients(labeled)) == 2
        assert not _patients(labeled) & _patients([u for u in unlabeled if u != "extra001"])
        assert json.loads((out / "dataset.json").read_text())["numTraining"] == 4
        assert json.loads((out / "label_budget.json").read_text())["selection"]["chosen"] == sorted(_patients(labeled))


def test_budget_by_fraction(grouped_source: Path) -> None:
    out = make_label_budget(500, 520, fraction=0.3, group_regex=r"(patient\d+)_frame")  # 1.5 of 5 -> 2 patients
    assert len(_ids(out / "imagesTr")) == 4 and len(_patients(_ids(out / "imagesTr"))) == 2
    out = make_label_budget(500, 521, fraction=0.01)  # at least one case
    assert len(_ids(out / "imagesTr")) == 1


def test_budget_by_cases(grouped_source: Path) -> None:
    out = make_label_budget(500, 530, cases=["patient002_frame01", "patient004_frame02"])
    assert _ids(out / "imagesTr") == ["patient002_frame01", "patient004_frame02"]
    out = make_label_budget(500, 531, cases=["patient002_frame01", "patient004"], group_regex=r"(patient\d+)")
    assert _ids(out / "imagesTr") == ["patient002_frame01", "patient002_frame02", "patient004_frame01",
                                      "patient004_frame02"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(cases=["patient009_frame01"]), "Unknown case 'patient009_frame01'"),
    (dict(n=11), "n=11 is larger than the 10 available cases"),
    (dict(n=6, group_regex=r"(patient\d+)"), "n=6 is larger than the 5 available groups"),
    (dict(n=1, group_regex=r"(subject\d+)"), "matches none of the 10 training cases"),
    (dict(n=1, group_regex=r"(patient00[1-3])"), "matches no group in 4 case"),
    (dict(n=1, group_regex=r"(patient"), "not a valid regular expression"),
    (dict(), "exactly one of n, fraction or cases"),
    (dict(n=1, fraction=0.5), "exactly one of n, fraction or cases"),
    (dict(fraction=1.5), "fraction must be in"),
    (dict(n=0), "positive integer"),
])
def test_budget_errors(grouped_source: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DatasetToolError, match=re.escape(message)):
        make_label_budget(500, 540, **kwargs)
    assert not list(grouped_source.parent.glob("Dataset540_*"))
    _no_leftovers(grouped_source.parent)


def test_budget_refuses_source_id_and_existing_target(grouped_source: Path) -> None:
    with pytest.raises(DatasetToolError, match="id of the source"):
        make_label_budget(500, 500, n=1)
    make_label_budget(500, 541, n=1)
    with pytest.raises(DatasetToolError, match="Dataset541_Grouped_1cases"):
        make_label_budget(500, 541, n=2)
    assert len(_ids(make_label_budget(500, 541, n=2, overwrite=True) / "imagesTr")) == 2


def test_budget_cli(grouped_source: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_sss_label_budget", "-d", "500", "-o", "550", "--cases", "patient003",
                                      "--group-regex", r"(patient\d+)", "--name", "Budget"])
    cli.label_budget_entry()
    out = grouped_source.parent / "Dataset550_Budget"
    assert str(out) in capsys.readouterr().out
    assert _patients(_ids(out / "imagesTr")) == {"patient003"}
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_sss_label_budget", "-d", "500", "-o", "551", "--n", "99"])
    with pytest.raises(SystemExit) as e:
        cli.label_budget_entry()
    assert e.value.code == 1 and "larger than" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ ACDC


def _fake_acdc(root: Path, slices: dict[str, list[int]], val: list[str], shape: tuple[int, int] = (8, 6)) -> Path:
    """A tiny SSL4MIS-style folder: 2D slices per training frame, 3D validation volumes, the two lists."""
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    for frame, numbers in slices.items():
        for k in numbers:
            with h5py.File(root / "data" / f"{frame}_slice_{k}.h5", "w") as f:
                f["image"] = rng.random(shape).astype(np.float32)
                f["label"] = rng.integers(0, 4, shape).astype(np.uint8)
    for frame in val:
        with h5py.File(root / "data" / f"{frame}.h5", "w") as f:
            f["image"] = rng.random((3, *shape)).astype(np.float32)
            f["label"] = rng.integers(0, 4, (3, *shape)).astype(np.uint8)
    (root / "train.list").write_text("".join(f"{f}\n" for f in slices))
    (root / "val.list").write_text("".join(f"{f}\n" for f in val))
    return root


def test_acdc_small_list_and_exact_restacking(tmp_path: Path, nnunet_dirs: dict[str, Path]) -> None:
    src = _fake_acdc(tmp_path / "acdc", {"patient001_frame01": [2, 1, 3], "patient001_frame02": [1, 2],
                                         "patient002_frame01": [1, 2, 3, 4]}, ["patient007_frame01"])
    out = convert_acdc(src, 101, labeled="patient002")
    assert out.name == "Dataset101_ACDC_1labeled"
    assert _ids(out / "imagesTr") == ["patient002_frame01"]
    assert _ids(out / "imagesUnlabeled") == ["patient001_frame01", "patient001_frame02"]
    assert _ids(out / "labelsTs", False) == ["patient007_frame01"]
    img = sitk.ReadImage(str(out / "imagesTr/patient002_frame01_0000.nii.gz"))
    assert img.GetSpacing() == pytest.approx((1.0, 1.0, 10.0))
    for k in range(4):  # slice_K is z = K-1, values unchanged
        with h5py.File(src / "data" / f"patient002_frame01_slice_{k + 1}.h5") as f:
            np.testing.assert_array_equal(sitk.GetArrayFromImage(img)[k], f["image"][()])
            np.testing.assert_array_equal(_read(out / "labelsTr/patient002_frame01.nii.gz")[k], f["label"][()])
    assert _read(out / "imagesUnlabeled/patient001_frame01_0000.nii.gz").shape == (3, 8, 6)
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 1
    out = convert_acdc(src, 102, labeled="all")
    assert out.name == "Dataset102_ACDC" and len(_ids(out / "imagesTr")) == 3
    assert not (out / "imagesUnlabeled").exists()


def test_acdc_parse_labeled() -> None:
    train = set(range(1, 101))
    assert parse_labeled("3", train) == (38, 50, 99)
    assert parse_labeled("7", train) == (21, 38, 49, 50, 58, 99, 100)
    assert parse_labeled("099, patient038,38", train) == (38, 99)
    with pytest.raises(DatasetToolError, match="comma list"):
        parse_labeled("three", train)
    with pytest.raises(DatasetToolError, match="099 are not in train.list"):
        parse_labeled("1", {1, 2})


def test_acdc_noncontiguous_slices_error(tmp_path: Path, nnunet_dirs: dict[str, Path]) -> None:
    src = _fake_acdc(tmp_path / "acdc", {"patient001_frame01": [1, 2], "patient002_frame01": [1, 2, 4, 5]},
                     ["patient007_frame01"])
    with pytest.raises(DatasetToolError, match=r"patient002_frame01: slices are not contiguous.*missing 3"):
        convert_acdc(src, 103, labeled="patient002")
    assert list(nnunet_dirs["nnUNet_raw"].iterdir()) == []  # nothing half-written


def test_acdc_layout_errors(tmp_path: Path, nnunet_dirs: dict[str, Path]) -> None:
    with pytest.raises(DatasetToolError, match="data not found"):
        convert_acdc(tmp_path, 104)
    src = _fake_acdc(tmp_path / "acdc", {"patient001_frame01": [1]}, ["patient007_frame01"])
    (src / "val.list").unlink()
    with pytest.raises(DatasetToolError, match=r"val\.list not found"):
        convert_acdc(src, 104, labeled="all")
    (src / "val.list").write_text("patient008_frame01\n")
    with pytest.raises(DatasetToolError, match=r"patient008_frame01\.h5 not found"):
        convert_acdc(src, 104, labeled="all")
    assert list(nnunet_dirs["nnUNet_raw"].iterdir()) == []


ACDC_3 = {38, 50, 99}


@pytest.fixture(scope="module")
def acdc3(acdc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real conversion (--labeled 3) through the installed console script."""
    work = tmp_path_factory.mktemp("acdc3")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / k).mkdir()
        env[k] = str(work / k)
    script = Path(sys.executable).parent / "nnUNetv2_sss_convert_acdc"
    proc = subprocess.run([str(script), "-i", str(acdc_dir), "-d", "27", "--labeled", "3"], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    return {"out": work / "nnUNet_raw" / "Dataset027_ACDC_3labeled", "stdout": proc.stdout}


def _frames(acdc_dir: Path, list_name: str) -> list[str]:
    return sorted(line.strip() for line in (acdc_dir / list_name).read_text().splitlines() if line.strip())


@pytest.mark.data
def test_acdc3_patient_sets(acdc3: dict, acdc_dir: Path) -> None:
    out = acdc3["out"]
    train = _frames(acdc_dir, "train.list")
    labeled = sorted(f for f in train if int(f[7:10]) in ACDC_3)
    assert len(labeled) == 6
    assert _ids(out / "imagesTr") == labeled == _ids(out / "labelsTr", False)
    unlabeled = _ids(out / "imagesUnlabeled")
    assert unlabeled == sorted(set(train) - set(labeled))
    assert len(_patients(unlabeled)) == 67 and not {int(p[7:]) for p in _patients(unlabeled)} & ACDC_3
    assert _ids(out / "imagesTs") == _ids(out / "labelsTs", False) == _frames(acdc_dir, "val.list")
    assert len(_ids(out / "imagesTs")) == 20
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 6
    assert f"{len(labeled)} labeled training cases, {len(unlabeled)} unlabeled cases, 20 test cases" in acdc3["stdout"]
    assert f"ACDC dataset: {out}" in acdc3["stdout"]


@pytest.mark.data
def test_acdc3_volumes_match_slices(acdc3: dict, acdc_dir: Path) -> None:
    out, data = acdc3["out"], acdc_dir / "data"
    n_slices: dict[str, int] = {}
    for line in (acdc_dir / "train_slices.list").read_text().split():
        frame, k = line.rsplit("_slice_", 1)
        n_slices[frame] = max(n_slices.get(frame, 0), int(k))
    reader = sitk.ImageFileReader()
    for f in sorted((out / "imagesUnlabeled").iterdir()):  # every unlabeled volume: shape from the header only
        frame = f.name[: -len("_0000.nii.gz")]
        reader.SetFileName(str(f))
        reader.ReadImageInformation()
        with h5py.File(data / f"{frame}_slice_1.h5") as h:
            assert reader.GetSize() == (*reversed(h["image"].shape), n_slices[frame])
    for frame in _ids(out / "imagesTr"):  # labeled volumes: voxel for voxel
        img = sitk.ReadImage(str(out / "imagesTr" / f"{frame}_0000.nii.gz"))
        assert img.GetSpacing() == pytest.approx((1.0, 1.0, 10.0))
        image, label = sitk.GetArrayFromImage(img), _read(out / "labelsTr" / f"{frame}.nii.gz")
        assert image.dtype == np.float32 and label.dtype == np.uint8 and image.shape[0] == n_slices[frame]
        for k in range(n_slices[frame]):
            with h5py.File(data / f"{frame}_slice_{k + 1}.h5") as h:
                np.testing.assert_array_equal(image[k], h["image"][()])
                np.testing.assert_array_equal(label[k], h["label"][()])
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
    for frame in _ids(out / "imagesTs")[:4]:
        label = _read(out / "labelsTs" / f"{frame}.nii.gz")
        with h5py.File(data / f"{frame}.h5") as h:
            np.testing.assert_array_equal(label, h["label"][()])
            assert _read(out / "imagesTs" / f"{frame}_0000.nii.gz").shape == h["image"].shape
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
