"""Issue 10: faults that used to lose or corrupt data silently, each reproduced and checked (CPU, seconds each).

One tiny synthetic dataset (5 labeled 2x32x32 cases, 3 unlabeled) is planned once with the real
``nnUNetv2_plan_and_preprocess``; trainers are real nnU-Net trainers built with nnU-Net's own
``get_trainer_from_args``. The only test double is ``_killing_save``: a ``torch.save`` that writes half of the
real bytes and then raises, standing in for a process killed in the middle of a checkpoint write.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import planned_synthetic, run_cli

DATASET_ID = 983


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("reliability")
    with planned_synthetic(root, DATASET_ID, n_labeled=5, n_unlabeled=3) as (dirs, raw):
        yield {**os.environ}, dirs, raw


def _out(dirs: dict[str, Path], raw: Path) -> Path:
    return dirs["nnUNet_preprocessed"] / raw.name / "nnUNetPlans_2d_unlabeled"


# ---------------------------------------------------------------- fault 1: truncated / 4D / vector inputs
def _extra_unlabeled(raw: Path, name: str, arr: np.ndarray, vector: bool = False) -> Path:
    path = raw / "imagesUnlabeled" / f"{name}_0000.nii.gz"
    img = sitk.GetImageFromArray(arr, isVector=vector)
    sitk.WriteImage(img, str(path), useCompression=True)
    return path


def test_truncated_gzip_image_is_refused_naming_the_file(planned):
    env, dirs, raw = planned
    from nnunetv2_sss.unlabeled.preprocess import UnlabeledDataError, preprocess_unlabeled

    path = _extra_unlabeled(raw, "cut", np.random.default_rng(0).random((2, 32, 32)).astype(np.float32) * 1000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    try:
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape == (2, 32, 32)  # the fault: ITK reads it
        with pytest.raises(UnlabeledDataError, match=r"cut_0000\.nii\.gz: the gzip stream is truncated"):
            preprocess_unlabeled(DATASET_ID, "2d", num_processes=1, force=True)
    finally:
        path.unlink()


def test_nifti_with_fewer_voxels_than_its_header_is_refused(tmp_path):
    from nnunetv2_sss.unlabeled.preprocess import UnlabeledDataError, verify_image_file

    path = tmp_path / "short.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 16, 16), np.float32)), str(path))
    verify_image_file(path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UnlabeledDataError, match=r"short\.nii: holds \d+ bytes but its NIfTI header declares"):
        verify_image_file(path)


@pytest.mark.parametrize("kind", ["4d", "vector"])
def test_4d_and_vector_images_report_their_shape(planned, kind):
    env, dirs, raw = planned
    from nnunetv2_sss.unlabeled.preprocess import UnlabeledDataError, preprocess_unlabeled

    arr = np.zeros((3, 2, 32, 32), np.float32) if kind == "4d" else np.zeros((2, 32, 32, 3), np.float32)
    path = _extra_unlabeled(raw, f"odd{kind}", arr, vector=kind == "vector")
    try:
        expected = r"size \(32, 32, 2, 3\) .* 1 component" if kind == "4d" else r"size \(32, 32, 2\) .* 3 component"
        with pytest.raises(UnlabeledDataError, match=expected + r".*one 2D or 3D scalar image per file"):
            preprocess_unlabeled(DATASET_ID, "2d", num_processes=1, force=True)
    finally:
        path.unlink()


# ---------------------------------------------------------------- fault 4 and 5: damaged output, stale folders
def test_damaged_preprocessed_output_is_not_up_to_date_and_is_redone(planned):
    env, dirs, raw = planned
    from nnunetv2_sss.unlabeled.preprocess import is_up_to_date, preprocess_unlabeled

    out = preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
    assert is_up_to_date(DATASET_ID, "2d")
    victim = sorted(out.glob("*.b2nd"))[0]
    victim.unlink()
    assert not is_up_to_date(DATASET_ID, "2d")
    proc = run_cli(env, "nnUNetv2_sss_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-np", "1")
    assert "incomplete" in proc.stderr and victim.is_file() and is_up_to_date(DATASET_ID, "2d")
    (out / f"{victim.name[:-5]}.pkl").write_bytes(b"")  # truncated properties count too
    assert not is_up_to_date(DATASET_ID, "2d")
    preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
    assert is_up_to_date(DATASET_ID, "2d")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_work_folders_of_dead_processes_are_removed(planned):
    env, dirs, raw = planned
    from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled

    out = _out(dirs, raw)
    stale = [out.with_name(f"{out.name}.tmp-{_dead_pid()}"), out.with_name(f"{out.name}.old-{_dead_pid()}")]
    alive = out.with_name(f"{out.name}.tmp-{os.getppid()}")  # a live process's work must be left alone
    for d in (*stale, alive):
        (d / "sss_meta").mkdir(parents=True)
    preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
    assert not any(d.exists() for d in stale) and alive.is_dir()
    alive.joinpath("sss_meta").rmdir()
    alive.rmdir()


def test_raw_dataset_staging_of_dead_processes_is_removed(nnunet_dirs):
    from nnunetv2_sss.datasets.synthetic import make_synthetic_dataset

    root = nnunet_dirs["nnUNet_raw"]
    name = "Dataset984_Leftovers"
    args = dict(n_labeled=2, n_unlabeled=1, n_test=0, shape=(2, 16, 16), overwrite=True)
    # a writer killed between moving the old dataset aside and renaming the new one in: the old copy is kept
    only_copy = root / f".{name}.old-{_dead_pid()}"
    (only_copy / "imagesTr").mkdir(parents=True)
    out = make_synthetic_dataset(984, "Leftovers", **args)
    assert out == root / name and (out / "dataset.json").is_file() and only_copy.is_dir()
    # beside an existing dataset, dead writers' staging and old copies go; a live writer's staging stays
    stale = [root / f".{name}.tmp-{_dead_pid()}", root / f".{name}.old-{_dead_pid()}"]
    alive = root / f".{name}.tmp-{os.getppid()}"
    for d in (*stale, alive):
        (d / "imagesTr").mkdir(parents=True)
    make_synthetic_dataset(984, "Leftovers", **args)
    assert (out / "dataset.json").is_file() and alive.is_dir()
    assert not any(d.exists() for d in (*stale, only_copy))


_PREPROCESS = ("import sys; from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled; "
               "preprocess_unlabeled(int(sys.argv[1]), '2d', num_processes=1, force=sys.argv[2] == 'force'); "
               "print('done')")


def test_concurrent_preprocessing_waits_for_the_lock(planned):
    """Two processes (two folds started together): the second waits while the first holds the lock, then both
    finish with a complete output instead of renaming the same folder at once."""
    env, dirs, raw = planned
    from nnunetv2_sss.unlabeled.preprocess import is_up_to_date, preprocessing_lock

    out = _out(dirs, raw)
    err_lines: list[str] = []
    blocked = threading.Event()

    def read_stderr(proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            err_lines.append(line)
            if "Waiting for another process" in line:
                blocked.set()

    with preprocessing_lock(out):
        waiting = subprocess.Popen([sys.executable, "-c", _PREPROCESS, str(DATASET_ID), "force"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        reader = threading.Thread(target=read_stderr, args=(waiting,), daemon=True)
        reader.start()
        # it says so when it reaches the lock, however long its imports take on a loaded machine
        assert blocked.wait(timeout=300), "".join(err_lines)
        time.sleep(2)
        assert waiting.poll() is None, "".join(err_lines)  # still blocked while the lock is held
        assert not list(out.parent.glob(f"{out.name}.tmp-{waiting.pid}"))
    second = subprocess.Popen([sys.executable, "-c", _PREPROCESS, str(DATASET_ID), "force"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [second.communicate(timeout=300)]
    waiting.wait(timeout=300)
    reader.join(timeout=30)
    assert [waiting.returncode, second.returncode] == [0, 0], ("".join(err_lines), results)
    assert "done" in waiting.stdout.read() and "done" in results[0][0]
    assert is_up_to_date(DATASET_ID, "2d")
    assert not list(out.parent.glob(f"{out.name}.tmp-*")) and not list(out.parent.glob(f"{out.name}.old-*"))


# ---------------------------------------------------------------- faults 2 and 3: checkpoints
def _trainer(fold: int = 0, name: str = "nnUNetTrainerSSS_noSAM_EMA"):
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args(str(DATASET_ID), "2d", fold, name, device=torch.device("cpu"))
    t.initialize()
    return t


def _killing_save(real_save, kill_at: int):
    """Test double for a kill during a write: call ``kill_at`` (1-based) writes half of the real bytes, then dies."""
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] != kill_at:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(half)
        else:
            f.write(half)
            f.flush()
        raise KeyboardInterrupt("killed during the checkpoint write (test double)")

    return save


@pytest.mark.parametrize("kill_at", [1, 2])
def test_kill_during_checkpoint_write_keeps_the_previous_complete_checkpoint(planned, monkeypatch, kill_at):
    """Call 1 is nnU-Net's serialisation (it used to truncate the final file: fault 3), call 2 the write with
    sss_state (it used to leave nnU-Net's checkpoint without sss_state: fault 2)."""
    t = _trainer()
    path = Path(t.output_folder) / "checkpoint_best.pth"
    t.sss_step = 7
    t.save_checkpoint(str(path))
    before = path.read_bytes()
    t.sss_step = 8
    with torch.no_grad():
        next(t.network.parameters()).add_(1.0)
    monkeypatch.setattr(torch, "save", _killing_save(torch.save, kill_at))
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint(str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["sss_state"]["sss_step"] == 7 and "dfe" in ckpt["sss_state"] and "ema_teacher" in ckpt["sss_state"]
    for f in Path(t.output_folder).glob("checkpoint_*"):
        f.unlink()


def test_resume_falls_back_to_the_newest_readable_checkpoint(planned, capsys):
    from nnunetv2.run.run_training import maybe_load_checkpoint

    t = _trainer()
    fold = Path(t.output_folder)
    t.sss_step, t.current_epoch = 5, 3
    t.save_checkpoint(str(fold / "checkpoint_best.pth"))
    t.sss_step, t.current_epoch = 9, 6
    t.save_checkpoint(str(fold / "checkpoint_latest.pth"))
    (fold / "checkpoint_final.pth").write_bytes(b"")  # killed while nnU-Net wrote it (before the fix)
    r = _trainer()
    maybe_load_checkpoint(r, True, False)  # what nnUNetv2_train --c does
    assert r.sss_step == 9 and r.current_epoch == 7
    for a, b in ((t.dfe, r.dfe), (t.ema_teacher.model, r.ema_teacher.model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    out = capsys.readouterr().out
    assert "checkpoint_final.pth cannot be used (unreadable" in out and "resuming from" in out
    assert "checkpoint_latest.pth (epoch 7)" in out
    for f in fold.glob("checkpoint_*"):
        f.unlink()


def test_resume_refuses_a_checkpoint_without_sss_state(planned, capsys):
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunetv2_sss.training.checkpoints import CheckpointError

    t = _trainer(fold=1)
    fold = Path(t.output_folder)
    nnUNetTrainer.save_checkpoint(t, str(fold / "checkpoint_latest.pth"))  # nnU-Net's part only
    with pytest.raises(CheckpointError, match=r"checkpoint_latest.pth: no 'sss_state'.*-pretrained_weights"):
        maybe_load_checkpoint(_trainer(fold=1), True, False)
    t.sss_step = 4
    t.save_checkpoint(str(fold / "checkpoint_best.pth"))  # a complete one exists: used, with a warning
    r = _trainer(fold=1)
    maybe_load_checkpoint(r, True, False)
    assert r.sss_step == 4 and "checkpoint_latest.pth cannot be used (no 'sss_state'" in capsys.readouterr().out
    for f in fold.glob("checkpoint_*"):
        f.unlink()


# ---------------------------------------------------------------- smaller faults (5)
def test_acdc_bare_patient_number_is_refused() -> None:
    from nnunetv2_sss.datasets.acdc import parse_labeled
    from nnunetv2_sss.datasets.label_budget import DatasetToolError

    train = set(range(1, 101))
    with pytest.raises(DatasetToolError, match=r"'5' is ambiguous.*--labeled patient005"):
        parse_labeled("5", train)
    assert parse_labeled("patient005", train) == parse_labeled("5,", train) == (5,)
    assert parse_labeled("3", train) == (38, 50, 99)


def test_sam2_checkpoint_directory_is_reported_as_a_directory(tmp_path) -> None:
    from nnunetv2_sss.sam.backend import SAM2Backend, SAM2CheckpointError

    with pytest.raises(SAM2CheckpointError, match="is a directory, not a checkpoint file"):
        SAM2Backend(tmp_path)


def test_evaluate_warns_about_and_counts_predicted_labels_outside_the_gt_set(tmp_path) -> None:
    from nnunetv2_sss.evaluation.metrics import evaluate_folders

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    gt = np.zeros((1, 12, 12), np.uint8)
    gt[0, 2:6, 2:6] = 1
    pred = gt.copy()
    pred[0, 8:10, 8:11] = 4  # a label the GT set {1} does not have
    for folder, arr in ((gt_dir, gt), (pred_dir, pred)):
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / "c.nii.gz"))
    with pytest.warns(UserWarning, match=r"label 4 in 1 case\(s\), 6 voxels"):
        summary = evaluate_folders(gt_dir, pred_dir, num_processes=1)
    assert summary["unexpected_predicted_labels"] == {"4": {"cases": ["c"], "voxels": 6}}


def test_user_error_before_training_is_one_clear_message(planned):
    """Stock nnUNetv2_train with a missing imagesUnlabeled: our message, not the end of a traceback (issue 10, 6)."""
    env, dirs, raw = planned
    unl = raw / "imagesUnlabeled"
    moved = raw.parent / "unlabeled_away"
    unl.rename(moved)
    try:
        proc = run_cli(env, "nnUNetv2_train", str(DATASET_ID), "2d", "2", "-tr", "nnUNetTrainerSSS_noSAM_smoke",
                       "-device", "cpu", ok=False)
        shown = proc.stderr
        assert proc.returncode == 1 and "nnunetv2-sss: UnlabeledDataError: No unlabeled images" in shown, shown[-3000:]
        assert "Traceback" not in shown and "nnUNet_sss_traceback=1" in shown
        again = run_cli({**env, "nnUNet_sss_traceback": "1"}, "nnUNetv2_train", str(DATASET_ID), "2d", "2", "-tr",
                        "nnUNetTrainerSSS_noSAM_smoke", "-device", "cpu", ok=False)
        assert "Traceback" in again.stderr and "imagesUnlabeled does not exist" in again.stderr
    finally:
        moved.rename(unl)
