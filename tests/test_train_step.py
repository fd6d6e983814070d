"""The semi-supervised ``train_step`` on the real trainer, network and DFE (synthetic data, CPU).

1. Each unsupervised term (strong views, feature perturbation, DFE) moves the network's gradients (and, for DFE,
   DFE's own); with its weight at zero it has no effect, and with every unsupervised weight at zero the gradient
   is exactly stock nnU-Net's supervised gradient (nnU-Net's loss on the labeled batch, unscaled).
2. Mirrored pseudo-labels (``pseudo_label_mirroring``) are the mean softmax over nnU-Net's inference mirror axes.
3. ``nnUNet_sss_seed`` makes two short ``nnUNetv2_train`` runs identical (data augmentation in-process,
   ``nnUNet_n_proc_DA=0``); another seed gives another run.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import planned_synthetic, run_cli

DATASET_ID = 985
TRAINER = "nnUNetTrainerSSS_noSAM"


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("step")
    with planned_synthetic(root, DATASET_ID, n_labeled=4, n_unlabeled=3, preprocess_unlabeled=True):
        yield root


def _trainer():
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args(str(DATASET_ID), "2d", 0, TRAINER, device=torch.device("cpu"))
    t.unsup_warmup_fraction = 0.0  # the semi-supervised step itself (tests/test_warm_start.py: the warm-up)
    t.configuration_manager.configuration["batch_size"] = 2
    t.initialize()
    t.confidence_threshold = 0.0  # an untrained network is never confident: make every pixel a pseudo-label
    return t


def _batches(t, n: int = 2) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    ps = tuple(t.configuration_manager.patch_size)
    data = torch.randn((n, 1, *ps), generator=g)
    with torch.no_grad():
        outs = t.network(data)
    labels = torch.randint(0, 4, (n, 1, *ps), generator=g).float()
    target = [torch.nn.functional.interpolate(labels, size=o.shape[2:], mode="nearest-exact") for o in outs]
    unlabeled = {"data": torch.randn((n, 3, *ps), generator=g), "target": torch.zeros((n, 1, *ps))}
    return {"data": data, "target": target}, unlabeled


def _grads(t, batch: dict, unlabeled: dict, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Gradients of one train_step with the given unsupervised weights; the optimizer does not step, so every call
    starts from the same weights. The step's randomness (partners, CutMix boxes, channel dropout) is reseeded."""
    captured: dict[str, torch.Tensor] = {}

    def backward_only(loss: torch.Tensor) -> None:
        loss.backward()
        named = [*(("net." + k, p) for k, p in t.network.named_parameters()),
                 *(("dfe." + k, p) for k, p in t.dfe.named_parameters())]
        captured.update({k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                         for k, p in named})

    t.optimizer_step = backward_only
    t.unsupervised_weights = lambda: {"s1": 0.0, "s2": 0.0, "fp": 0.0, "dfe": 0.0, "sam": 0.0, **weights}
    t.dataloader_unlabeled = iter([unlabeled])
    torch.manual_seed(123)
    t.train_step(batch)
    return captured


def _differs(a: dict, b: dict, prefix: str) -> bool:
    return any(not torch.allclose(a[k], b[k], atol=1e-9, rtol=0) for k in a if k.startswith(prefix))


def _same(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-7, rtol=1e-5) for k in a)


@pytest.mark.slow
def test_each_unsupervised_term_moves_gradients_and_zero_weight_removes_it(planned) -> None:
    t = _trainer()
    batch, unlabeled = _batches(t)
    none = _grads(t, batch, unlabeled, {})
    # zero unsupervised weights: exactly nnU-Net's supervised gradient on the labeled batch
    t.optimizer.zero_grad(set_to_none=True)
    t.loss(t.network(batch["data"]), batch["target"]).backward()
    stock = {f"net.{k}": p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for k, p in t.network.named_parameters()}
    assert _same({k: none[k] for k in stock}, stock)
    assert not _differs(none, {k: torch.zeros_like(v) for k, v in none.items()}, "dfe.")  # DFE idle

    for term in ("s1", "s2", "fp", "dfe"):
        on = _grads(t, batch, unlabeled, {term: 1.0})
        assert _differs(on, none, "net."), f"{term}: no effect on the network's gradients"
        assert _same(_grads(t, batch, unlabeled, {term: 0.0}), none), f"{term}: weight 0 still has an effect"
    on = _grads(t, batch, unlabeled, {"dfe": 1.0})
    # zero-initialised output projection: only it gets a gradient at step 0, and it does
    assert _differs(on, none, "dfe."), "DFE's parameters get no gradient from the DFE term"
    # the other terms never reach DFE
    assert not _differs(_grads(t, batch, unlabeled, {"s1": 1.0, "s2": 1.0, "fp": 1.0}), none, "dfe.")


@pytest.mark.slow
def test_mirrored_pseudo_labels_average_the_weak_prediction_over_nnunets_mirror_axes(planned) -> None:
    t = _trainer()
    batch, unlabeled = _batches(t)
    t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()  # sets nnU-Net's inference mirror axes
    assert tuple(t.inference_allowed_mirroring_axes) == (0, 1)
    t.dataloader_unlabeled = iter([unlabeled])
    u = t.sample_unlabeled()
    with torch.no_grad():
        _, weak = t.forward_labeled_and_weak(batch["data"], u)
        t.pseudo_label_mirroring = False
        assert t.weak_logits(u, weak)[0] is weak.logits  # off: the weak view's own prediction
        t.pseudo_label_mirroring = True  # the default
        got = torch.softmax(t.weak_logits(u, weak)[0], dim=1)
        # by hand: the mean softmax of the network over the weak view and its three mirror images
        want = sum(torch.softmax(torch.flip(t.network(torch.flip(u.x_w, d))[0], d), dim=1)
                   for d in ([], [2], [3], [2, 3])) / 4
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, torch.softmax(weak.logits, dim=1), atol=1e-3)  # the mirror images changed it


def _short_run(planned, seed: int, name: str) -> dict[str, torch.Tensor]:
    env = {**os.environ, "nnUNet_results": str(planned / name), "nnUNet_sss_seed": str(seed),
           "nnUNet_sss_num_epochs": "1", "nnUNet_sss_iterations_per_epoch": "3",
           "nnUNet_sss_val_iterations_per_epoch": "1", "nnUNet_n_proc_DA": "0", "OMP_NUM_THREADS": "1",
           "nnUNet_compile": "f"}
    run_cli(env, "nnUNetv2_train", str(DATASET_ID), "2d", "all", "-tr", TRAINER, "-device", "cpu")
    ck = next((planned / name).rglob("checkpoint_final.pth"))
    state = torch.load(ck, map_location="cpu", weights_only=False)
    return {**{f"net.{k}": v for k, v in state["network_weights"].items()},
            **{f"dfe.{k}": v for k, v in state["sss_state"]["dfe"].items()}}


@pytest.mark.slow
def test_seed_makes_two_short_runs_identical(planned) -> None:
    a, b, c = _short_run(planned, 7, "a"), _short_run(planned, 7, "b"), _short_run(planned, 8, "c")
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"same seed, different weights: {diff[:5]}"
    assert any(not torch.equal(a[k], c[k]) for k in a), "another seed gave the same run"


def test_progress_semi_png_has_supervised_unsupervised_and_fraction_panels(tmp_path) -> None:
    import matplotlib.pyplot as plt
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    from nnunetv2_sss.training.progress import (
        FRACTION_KEYS,
        LOSS_KEYS,
        SEMI_PROGRESS_PNG,
        SSSLocalLogger,
        class_fraction_keys,
    )

    ours, stock = SSSLocalLogger(LOSS_KEYS, FRACTION_KEYS + class_fraction_keys(3)), LocalLogger()
    assert ours._panels()[0][1] == ["sss_loss_sup"]  # the supervised loss has a panel of its own
    assert "sss_confident_fraction_c1" in ours._panels()[2][1] and "sss_dfe_similarity" in ours._panels()[2][1]
    for e in range(3):
        for lg in (ours, stock):
            for k in lg.my_fantastic_logging:
                lg.log(k, [0.5, 0.5] if k == "dice_per_class_or_region" else float(e) / 3, e)
    for lg, name in ((ours, "ours"), (stock, "stock")):
        (tmp_path / name).mkdir()
        lg.plot_progress_png(str(tmp_path / name))
    ours_png, stock_png = (plt.imread(tmp_path / n / "progress.png") for n in ("ours", "stock"))
    assert ours_png.shape == stock_png.shape  # nnU-Net's figure is left as nnU-Net draws it
    assert not (tmp_path / "stock" / SEMI_PROGRESS_PNG).exists()
    semi = plt.imread(tmp_path / "ours" / SEMI_PROGRESS_PNG)
    assert semi.shape[0] == 3 * 320  # one panel of 3.2 inches at 100 dpi each: supervised, unsupervised, fractions
