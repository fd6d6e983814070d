"""Supervised first, then semi-supervised: the warm start and the one-run supervised warm-up.

1. A trainer warm-started from a supervised checkpoint (``nnUNet_sss_init_checkpoint``) predicts exactly like the
   supervised model before its first step (segmentation heads loaded), its EMA teacher starts equal to the loaded
   network, and it uses the warm-start learning rate.
2. A checkpoint of another dataset, label set, configuration, fold or network is refused with the reason.
3. Supervised warm-up steps draw no unlabeled batch and give nnU-Net's own update.
4. Through stock ``nnUNetv2_train``: a warm-started run finishes and says where it started from.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from conftest import planned_synthetic, run_cli

DATASET_ID = 987


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic dataset, planned, with a supervised checkpoint of fold ``all`` (stock nnU-Net's loss)."""
    root = tmp_path_factory.mktemp("warm")
    with planned_synthetic(root, DATASET_ID, n_labeled=4, n_unlabeled=3, preprocess_unlabeled=True) as (dirs, _):
        env = {**os.environ, "nnUNet_sss_seed": "3", "nnUNet_sss_num_epochs": "1",
               "nnUNet_sss_iterations_per_epoch": "4", "nnUNet_sss_val_iterations_per_epoch": "1",
               "nnUNet_sss_skip_final_validation": "1"}
        run_cli(env, "nnUNetv2_train", str(DATASET_ID), "2d", "all", "-tr", "nnUNetTrainer_budget", "-device", "cpu")
        ck = next(dirs["nnUNet_results"].rglob("nnUNetTrainer_budget__*/fold_all/checkpoint_final.pth"))
        yield root, ck


def _trainer(name: str, init: Path | None, fold="all"):
    from nnunetv2.run.run_training import get_trainer_from_args

    if init is None:
        os.environ.pop("nnUNet_sss_init_checkpoint", None)
    else:
        os.environ["nnUNet_sss_init_checkpoint"] = str(init)
    try:
        t = get_trainer_from_args(str(DATASET_ID), "2d", fold, name, device=torch.device("cpu"))
        t.initialize()
    finally:
        os.environ.pop("nnUNet_sss_init_checkpoint", None)
    return t


def _supervised_network(ck: Path):
    t = _trainer("nnUNetTrainer", None)
    t.load_checkpoint(str(ck))
    return t.network.eval()


def test_warm_started_trainer_predicts_like_the_supervised_model_and_teacher_starts_equal(supervised) -> None:
    _, ck = supervised
    sup = _supervised_network(ck)
    t = _trainer("nnUNetTrainerSSS_noSAM_EMA", ck)
    x = torch.randn((2, 1, *t.configuration_manager.patch_size), generator=torch.Generator().manual_seed(0))
    net = t.network.eval()
    with torch.no_grad():
        ref, out, teacher = sup(x), net(x), t.ema_teacher.model(x)
    for r, o, te in zip(ref, out, teacher):
        assert torch.equal(r, o), "the warm-started network does not predict like the supervised model"
        assert torch.equal(r, te), "the EMA teacher does not start as the loaded network"
    heads = [k for k in sup.state_dict() if ".seg_layers." in k]
    assert heads and all(torch.equal(sup.state_dict()[k], net.state_dict()[k]) for k in heads)
    assert t.initial_lr == t.warm_start_initial_lr and t.supervised_warmup_steps() == 0
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(t.warm_start_initial_lr)
    # the DFE is made after the load and is the identity at its start: it cannot change what was loaded
    assert t.dfe is not None


def _edited(ck: Path, tmp: Path, name: str, edit) -> Path:
    c = torch.load(ck, map_location="cpu", weights_only=False)
    edit(c)
    out = tmp / f"{name}.pth"
    torch.save(c, out)
    return out


@pytest.mark.parametrize("what, edit", [
    ("dataset", lambda c: c["init_args"]["plans"].__setitem__("dataset_name", "Dataset123_Other")),
    ("labels", lambda c: c["init_args"]["dataset_json"].__setitem__("labels", {"background": 0, "liver": 1})),
    ("configuration", lambda c: c["init_args"].__setitem__("configuration", "3d_fullres")),
    ("fold", lambda c: c["init_args"].__setitem__("fold", 3)),
    ("network", lambda c: c["network_weights"].pop(next(k for k in c["network_weights"] if "seg_layers" in k))),
])
def test_mismatched_checkpoint_is_refused_with_its_reason(supervised, tmp_path: Path, what: str, edit) -> None:
    from nnunetv2_sss.training.warm_start import WarmStartError

    _, ck = supervised
    bad = _edited(ck, tmp_path, what, edit)
    fold = 0 if what == "fold" else "all"
    with pytest.raises(WarmStartError, match=f"{what}:"):
        _trainer("nnUNetTrainerUniMatch", bad, fold=fold)


def test_unreadable_or_missing_checkpoint_is_refused(supervised, tmp_path: Path) -> None:
    from nnunetv2_sss.training.warm_start import WarmStartError

    _, ck = supervised
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(WarmStartError, match="cannot be read"):
        _trainer("nnUNetTrainerUniMatch", truncated)
    with pytest.raises(WarmStartError, match="no such file"):
        _trainer("nnUNetTrainerUniMatch", tmp_path / "missing.pth")


def test_warmup_steps_draw_no_unlabeled_batch_and_give_nnunets_update(supervised) -> None:
    t = _trainer("nnUNetTrainerSSS_noSAM", None)
    stock = _trainer("nnUNetTrainer", None)
    stock.network.load_state_dict(t.network.state_dict())
    stock.optimizer.load_state_dict(copy.deepcopy(stock.optimizer.state_dict()))
    assert t.supervised_warmup_steps() == round(0.2 * t.num_epochs * t.num_iterations_per_epoch) > 0

    class NoDraw:
        def __next__(self):
            raise AssertionError("a warm-up step drew an unlabeled batch")

    t.dataloader_unlabeled = NoDraw()
    g = torch.Generator().manual_seed(1)
    ps = tuple(t.configuration_manager.patch_size)
    data = torch.randn((2, 1, *ps), generator=g)
    with torch.no_grad():
        shapes = [o.shape[2:] for o in t.network(data)]
    labels = torch.randint(0, 4, (2, 1, *ps), generator=g).float()
    target = [torch.nn.functional.interpolate(labels, size=s, mode="nearest-exact") for s in shapes]
    out = t.train_step({"data": data, "target": target})
    ref = stock.train_step({"data": data, "target": target})
    assert t.sss_step == 1 and float(out["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-6)
    for (k, a), b in zip(t.network.state_dict().items(), stock.network.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6), f"{k}: the warm-up step is not nnU-Net's step"
    assert all(p.grad is None for p in t.dfe.parameters())  # DFE untouched during the warm-up
    assert t.unsupervised_rampup() < 0.01  # the ramp starts where the warm-up ends


@pytest.mark.slow
def test_warm_started_run_through_stock_nnunetv2_train(supervised) -> None:
    root, ck = supervised
    out = root / "ws_results"
    env = {**os.environ, "nnUNet_results": str(out), "nnUNet_sss_init_checkpoint": str(ck), "nnUNet_sss_seed": "0",
           "nnUNet_sss_num_epochs": "1", "nnUNet_sss_iterations_per_epoch": "2",
           "nnUNet_sss_val_iterations_per_epoch": "1", "nnUNet_sss_skip_final_validation": "1",
           "nnUNet_sss_warm_start_lr": "0.001"}
    run_cli(env, "nnUNetv2_train", str(DATASET_ID), "2d", "all", "-tr", "nnUNetTrainerSSS_noSAM", "-device", "cpu")
    log = next(out.rglob("training_log_*.txt")).read_text()
    assert f"warm start from {ck}" in log and "initial lr 0.001" in log
    bad = root / "bad.pth"
    bad.write_text("not a checkpoint")
    proc = run_cli({**env, "nnUNet_results": str(root / "bad_results"), "nnUNet_sss_init_checkpoint": str(bad)},
                   "nnUNetv2_train", str(DATASET_ID), "2d", "all", "-tr", "nnUNetTrainerSSS_noSAM", "-device", "cpu",
                   ok=False)
    assert proc.returncode != 0 and "WarmStartError" in proc.stderr and "cannot be read" in proc.stderr


def test_pseudo_label_settings_come_from_env_and_out_of_range_is_refused(supervised, monkeypatch) -> None:
    monkeypatch.setenv("nnUNet_sss_background_threshold", "0.99")
    monkeypatch.setenv("nnUNet_sss_unsup_weight", "2")
    t = _trainer("nnUNetTrainerSSS_noSAM", None)
    assert t.background_threshold == 0.99 and t.unsup_weight == 2.0
    t.sss_step = t.num_epochs * t.num_iterations_per_epoch  # past the warm-up and the ramp: every weight whole
    w = t.unsupervised_weights()
    assert t.use_dfe and t.lambda_dfe > 0
    assert (w["s1"], w["s2"], w["fp"], w["dfe"]) == (2 * t.lambda_s1, 2 * t.lambda_s2, 2 * t.lambda_fp,
                                                     2 * t.lambda_dfe)
    monkeypatch.setenv("nnUNet_sss_unsup_weight", "-1")
    with pytest.raises(ValueError, match="unsup_weight must be a finite number >= 0"):
        _trainer("nnUNetTrainerSSS_noSAM", None)
    monkeypatch.setenv("nnUNet_sss_unsup_weight", "1")
    monkeypatch.setenv("nnUNet_sss_background_threshold", "1.5")
    with pytest.raises(ValueError, match="background_threshold must be a softmax confidence"):
        _trainer("nnUNetTrainerSSS_noSAM", None)
    monkeypatch.delenv("nnUNet_sss_background_threshold")
    assert t.pseudo_label_mirroring  # mirrored pseudo-labels are the default
    monkeypatch.setenv("nnUNet_sss_pseudo_label_mirroring", "0")
    assert not _trainer("nnUNetTrainerSSS_noSAM", None).pseudo_label_mirroring
    monkeypatch.setenv("nnUNet_sss_pseudo_label_mirroring", "yes")
    with pytest.raises(ValueError, match="nnUNet_sss_pseudo_label_mirroring must be 1 .on. or 0 .off., got 'yes'"):
        _trainer("nnUNetTrainerSSS_noSAM", None)
