"""The real nnU-Net commands end to end on the embedded synthetic dataset (CPU), plus checkpoint round trips.

Stock ``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train`` (trainer found through ``nnUNet_extTrainer``) and
``nnUNetv2_predict``; our ``nnUNetv2_sss_preprocess_unlabeled``. One module-scoped dataset keeps this to a few
minutes.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_cli

pytestmark = pytest.mark.slow
DATASET_ID = 981


def _env(dirs: dict[str, Path]) -> dict[str, str]:
    from nnunetv2_sss.cli import ensure_ext_trainer_env

    env = dict(os.environ)
    env.update({k: str(v) for k, v in dirs.items()})
    env.update(nnUNet_n_proc_DA="0", nnUNet_compile="f", nnUNet_def_n_proc="1", OMP_NUM_THREADS="1")
    env["nnUNet_extTrainer"] = ensure_ext_trainer_env()
    return env


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("pipeline")
    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for v in dirs.values():
        v.mkdir()
    env = _env(dirs)
    old = {k: os.environ.get(k) for k in dirs}
    os.environ.update({k: str(v) for k, v in dirs.items()})
    from nnunetv2_sss.datasets.synthetic import make_synthetic_dataset

    raw = make_synthetic_dataset(dataset_id=DATASET_ID, n_labeled=5, n_unlabeled=6, n_test=2, overwrite=True)
    run_cli(env, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "-np", "1")
    yield env, dirs, raw
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_preprocess_unlabeled_cli_output_and_staleness(planned):
    env, dirs, raw = planned
    proc = run_cli(env, "nnUNetv2_sss_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-np", "1")
    out = dirs["nnUNet_preprocessed"] / raw.name / "nnUNetPlans_2d_unlabeled"
    assert str(out) in proc.stdout
    cases = sorted(p.name[:-5] for p in out.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    assert len(cases) == 6
    with open(out / f"{cases[0]}.pkl", "rb") as f:
        props = pickle.load(f)
    assert set(props["class_locations"]) == {1, 2, 3} and props["class_locations"][1].shape == (0, 4)

    from nnunetv2_sss.unlabeled.preprocess import is_up_to_date

    assert is_up_to_date(DATASET_ID, "2d")
    img = next((raw / "imagesUnlabeled").glob("*.nii.gz"))
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert not is_up_to_date(DATASET_ID, "2d")
    run_cli(env, "nnUNetv2_sss_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "2d", "-np", "1")
    assert is_up_to_date(DATASET_ID, "2d")
    assert not list(out.parent.glob("*.tmp-*")) and not list(out.parent.glob("*.old-*"))


def test_train_with_stock_command_then_predict(planned):
    env, dirs, raw = planned
    trainer = "nnUNetTrainerSSS_noSAM_smoke"
    run_cli(env, "nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu")
    fold = dirs["nnUNet_results"] / raw.name / f"{trainer}__nnUNetPlans__2d" / "fold_0"
    assert all((fold / f).is_file() for f in ("progress.png", "progress_semi.png", "checkpoint_final.pth"))
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert set(ckpt["sss_state"]) >= {"dfe", "sss_step"} and ckpt["sss_state"]["sss_step"] == 6
    assert not any(k.startswith("dfe") for k in ckpt["network_weights"])
    log = ckpt["logging"]
    assert len(log["sss_loss_s1"]) == 2 and np.isfinite(log["sss_loss_fp"]).all()
    assert all(0 <= v <= 1 for v in log["sss_confident_fraction"])

    # the stock network loads the weights with no extra keys
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # noqa: F401
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(str(fold.parent / "plans.json"))
    cm = pm.get_configuration("2d")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 4, False)
    net.load_state_dict(ckpt["network_weights"])

    pred = dirs["nnUNet_results"].parent / "pred"
    run_cli(env, "nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID), "-c", "2d",
            "-f", "0", "-tr", trainer, "-chk", "checkpoint_final.pth", "-npp", "1", "-nps", "1", "-device", "cpu",
            "--disable_tta")
    outs = sorted(pred.glob("*.nii.gz"))
    assert len(outs) == 2
    ref = sitk.ReadImage(str(next((raw / "labelsTs").glob("*.nii.gz"))))
    got = sitk.ReadImage(str(outs[0]))
    assert got.GetSize() == ref.GetSize() and np.allclose(got.GetSpacing(), ref.GetSpacing())
    assert set(np.unique(sitk.GetArrayFromImage(got))) <= {0, 1, 2, 3}

    # --c continues from the final checkpoint's epoch count (already finished: training exits cleanly)
    run_cli(env, "nnUNetv2_train", str(DATASET_ID), "2d", "0", "-tr", trainer, "-device", "cpu", "--c")

    # nnU-Net's model selection and ensembling treat the trainer like any other
    assert (fold / "validation" / "summary.json").is_file()
    run_cli(env, "nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "2d", "-tr", trainer, "-f", "0")
    info = json.loads((dirs["nnUNet_results"] / raw.name / "inference_information.json").read_text())
    assert info["best_model_or_ensemble"]["selected_model_or_models"][0]["trainer"] == trainer
    probs = []
    for chk in ("checkpoint_final.pth", "checkpoint_best.pth"):
        out = dirs["nnUNet_results"].parent / f"pred_{chk.split('.')[0]}"
        run_cli(env, "nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET_ID),
                "-c", "2d", "-f", "0", "-tr", trainer, "-chk", chk, "-npp", "1", "-nps", "1", "-device", "cpu",
                "--disable_tta", "--save_probabilities")
        probs.append(str(out))
    ens = dirs["nnUNet_results"].parent / "ensemble"
    run_cli(env, "nnUNetv2_ensemble", "-i", *probs, "-o", str(ens), "-np", "1")
    assert len(list(ens.glob("*.nii.gz"))) == 2


def test_checkpoint_round_trip_restores_network_dfe_ema_optimizer(planned, tmp_path):
    env, dirs, raw = planned
    os.environ.update(nnUNet_n_proc_DA="0", nnUNet_compile="f", nnUNet_extTrainer=env["nnUNet_extTrainer"])
    from nnunetv2.run.run_training import get_trainer_from_args

    def make():
        t = get_trainer_from_args(str(DATASET_ID), "2d", 1, "nnUNetTrainerSSS_noSAM_EMA", device=torch.device("cpu"))
        t.num_epochs, t.num_iterations_per_epoch = 1, 2
        return t

    a = make()
    a.on_train_start()
    a.on_train_epoch_start()
    for _ in range(2):
        a.train_step(next(a.dataloader_train))
    path = str(tmp_path / "ck.pth")
    a.save_checkpoint(path)
    b = make()
    b.load_checkpoint(path)
    for sa, sb in ((a.network.state_dict(), b.network.state_dict()), (a.dfe.state_dict(), b.dfe.state_dict()),
                   (a.ema_teacher.state_dict(), b.ema_teacher.state_dict())):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert len(oa["param_groups"]) == len(ob["param_groups"]) == 2  # network + DFE
    assert all(torch.equal(oa["state"][k]["momentum_buffer"], ob["state"][k]["momentum_buffer"])
               for k in oa["state"])
    assert b.sss_step == a.sss_step == 2
    a.on_train_end()


def _write(path: Path, arr: np.ndarray, spacing=(1.5, 1.5, 5.0)) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def test_region_based_dataset_is_refused_with_advice(planned):
    env, dirs, raw = planned
    os.environ.update(nnUNet_extTrainer=env["nnUNet_extTrainer"])
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args(str(DATASET_ID), "2d", 0, "nnUNetTrainerSSS_noSAM_smoke", device=torch.device("cpu"))
    regions = {**t.dataset_json, "labels": {"background": 0, "heart": [1, 2, 3], "lv": 3},
               "regions_class_order": [1, 3]}
    t.label_manager = t.plans_manager.get_label_manager(regions)  # as nnU-Net's __init__ builds it
    with pytest.raises(ValueError, match="label-based dataset.*stock nnUNetTrainer"):
        t.initialize()


def test_bad_unlabeled_inputs_give_clear_errors(planned):
    env, dirs, raw = planned
    from nnunetv2_sss.unlabeled.preprocess import UnlabeledDataError, preprocess_unlabeled

    unl = raw / "imagesUnlabeled"
    moved = raw.parent / "unlabeled_backup"
    unl.rename(moved)
    try:
        with pytest.raises(UnlabeledDataError, match="imagesUnlabeled does not exist"):
            preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
        unl.mkdir()
        with pytest.raises(UnlabeledDataError, match="holds no images"):
            preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
        (unl / "x_0000.png").write_bytes(b"")
        with pytest.raises(UnlabeledDataError, match=r"x_0000.png: file ending differs"):
            preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
        (unl / "x_0000.png").unlink()
        _write(unl / "two_0000.nii.gz", np.zeros((6, 64, 64), np.float32))
        _write(unl / "two_0001.nii.gz", np.zeros((6, 64, 64), np.float32))
        with pytest.raises(UnlabeledDataError, match=r"'two'.*channel files \[0, 1\].*1 channel"):
            preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
        for f in unl.iterdir():
            f.unlink()
        (unl / "broken_0000.nii.gz").write_bytes(b"not a nifti")
        with pytest.raises(UnlabeledDataError, match=r"Could not preprocess unlabeled case 'broken'.*broken_0000"):
            preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
        (unl / "broken_0000.nii.gz").unlink()
        _write(unl / "flat_0000.nii.gz", np.random.rand(1, 64, 64).astype(np.float32))
        with pytest.raises(UnlabeledDataError, match=r"'flat'.*is 2D.*labeled training images are 3D"):
            preprocess_unlabeled(DATASET_ID, "2d", num_processes=1)
        pre = dirs["nnUNet_preprocessed"] / raw.name
        assert not list(pre.glob("*.tmp-*"))  # nothing half-written
    finally:
        import shutil

        shutil.rmtree(unl, ignore_errors=True)
        moved.rename(unl)


def test_sss_trainer_without_unlabeled_images_fails_with_advice(planned, tmp_path):
    env, dirs, raw = planned
    unl = raw / "imagesUnlabeled"
    moved = raw.parent / "unlabeled_away"
    unl.rename(moved)
    try:
        proc = run_cli(env, "nnUNetv2_train", str(DATASET_ID), "2d", "1", "-tr", "nnUNetTrainerSSS_noSAM_smoke",
                       "-device", "cpu", ok=False)
        assert proc.returncode != 0
        assert "imagesUnlabeled does not exist" in proc.stdout + proc.stderr
        assert "nnUNetTrainer" in proc.stdout + proc.stderr
    finally:
        moved.rename(unl)


@pytest.mark.data
def test_hippocampus_3d_fullres_on_a_label_budget(hippocampus_dir, nnunet_dirs, tmp_path):
    """A short 3d_fullres run on real MSD Hippocampus volumes, 4 labeled of 12 (CutMix boxes in 3D)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from nnunetv2_sss.datasets.label_budget import make_label_budget

    src = nnunet_dirs["nnUNet_raw"] / "Dataset970_HippoSrc"
    (src / "imagesTr").mkdir(parents=True)
    (src / "labelsTr").mkdir()
    names = sorted(p.name for p in (hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:12]
    for n in names:
        case = n[: -len(".nii.gz")]
        os.symlink(hippocampus_dir / "imagesTr" / n, src / "imagesTr" / f"{case}_0000.nii.gz")
        os.symlink(hippocampus_dir / "labelsTr" / n, src / "labelsTr" / n)
    generate_dataset_json(str(src), {0: "MRI"}, {"background": 0, "anterior": 1, "posterior": 2}, len(names),
                          ".nii.gz", dataset_name="HippoSrc")
    out = make_label_budget(970, 971, n=4, seed=0)
    assert len(list((out / "imagesUnlabeled").glob("*.nii.gz"))) == 8
    env = _env(nnunet_dirs)
    run_cli(env, "nnUNetv2_plan_and_preprocess", "-d", "971", "-c", "3d_fullres", "-np", "1")
    run_cli(env, "nnUNetv2_train", "971", "3d_fullres", "all", "-tr", "nnUNetTrainerSSS_noSAM_smoke", "-device", "cpu")
    fold = nnunet_dirs["nnUNet_results"] / out.name / "nnUNetTrainerSSS_noSAM_smoke__nnUNetPlans__3d_fullres"
    ckpt = torch.load(fold / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert np.isfinite(ckpt["logging"]["sss_loss_s1"]).all()
