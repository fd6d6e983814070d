"""The multi-process path of the semi-supervised step, proven on the CPU: two processes, torch.distributed on gloo.

nnU-Net's DDP needs CUDA only where it wraps the network (``DDP(network, device_ids=[rank])``) and picks the
device; this test replaces exactly that wrapper with a CPU ``DistributedDataParallel`` (no device ids) and sets
the device to CPU. Everything else is the real trainer: nnU-Net's batch split and DDP batch Dice, our unlabeled
batch split, gradient all-reduce (the step calls encoder and decoder directly, bypassing DDP's hooks), the
cross-rank sums of the unsupervised CE/Dice, the DFE broadcast and the EMA teacher.

1. One optimizer step on two ranks, each with half of the labeled and half of the unlabeled batch, gives the same
   parameters (network, DFE, EMA teacher) as one process with the whole batch. Randomness that depends on how the
   batch is split is disabled here: CutMix (``cutmix_p = 0``: partners are drawn within a rank's batch) and feature
   dropout (``feature_dropout_p = 0``: each process draws its own channel masks). Batches are fixed tensors.
2. Ranks seeded differently start from identical network, DFE and teacher weights, and stay identical after several
   steps on different data with CutMix and feature dropout on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import planned_synthetic

DATASET_ID = 984
TRAINER = "nnUNetTrainerSSS_noSAM_EMA"
N_LATER_STEPS = 3


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ddp")
    with planned_synthetic(root, DATASET_ID, n_labeled=5, n_unlabeled=3):
        yield root


def _trainer(global_batch: int, cpu_ddp: bool = False):
    """The real trainer on the CPU with the global batch size set in its plans; ``cpu_ddp`` swaps nnU-Net's CUDA
    DDP wrapper for a CPU one (the only stand-in of this test)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as nnunet_trainer_module
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args(str(DATASET_ID), "2d", 0, TRAINER, device=torch.device("cpu"))
    t.unsup_warmup_fraction = 0.0  # the semi-supervised step itself (tests/test_warm_start.py: the warm-up)
    t.configuration_manager.configuration["batch_size"] = global_batch
    t.device, t.grad_scaler = torch.device("cpu"), None  # nnU-Net sets cuda:<rank> under DDP
    if cpu_ddp:
        nnunet_trainer_module.DDP = lambda module, device_ids=None: torch.nn.parallel.DistributedDataParallel(module)
    t.cutmix_p, t.feature_dropout_p = 0.0, 0.0
    t.initialize()
    return t


def _states(t) -> dict[str, dict[str, torch.Tensor]]:
    from nnunetv2_sss.training.warm_start import unwrap_network

    return {"net": {k: v.detach().clone() for k, v in unwrap_network(t.network).state_dict().items()},
            "dfe": {k: v.detach().clone() for k, v in t.dfe.state_dict().items()},
            "ema": {k: v.detach().clone() for k, v in t.ema_teacher.state_dict().items()}}


def _load_states(t, states: dict) -> None:
    from nnunetv2_sss.training.warm_start import unwrap_network

    unwrap_network(t.network).load_state_dict(states["net"])
    t.dfe.load_state_dict(states["dfe"])
    t.ema_teacher.load_state_dict(states["ema"])


def _step(t, batch: dict, unlabeled: dict) -> None:
    t.dataloader_unlabeled = iter([unlabeled])
    t.train_step(batch)


def _slice(batch: dict, lo: int, hi: int) -> dict:
    return {k: [x[lo:hi] for x in v] if isinstance(v, list) else v[lo:hi] for k, v in batch.items()}


def _make_batches(t, n: int, seed: int) -> tuple[dict, dict]:
    """A labeled batch with deep-supervision targets shaped like the network's outputs, and an unlabeled batch of
    [weak, strong1, strong2] views with every pixel valid."""
    g = torch.Generator().manual_seed(seed)
    ps = tuple(t.configuration_manager.patch_size)
    data = torch.randn((n, 1, *ps), generator=g)
    with torch.no_grad():
        outs = t.network(data)
    labels = torch.randint(0, 4, (n, 1, *ps), generator=g).float()
    target = [torch.nn.functional.interpolate(labels, size=o.shape[2:], mode="nearest-exact") for o in outs]
    unlabeled = {"data": torch.randn((n, 3, *ps), generator=g), "target": torch.zeros((n, 1, *ps))}
    return {"data": data, "target": target}, unlabeled


def _worker(rank: int, world: int, work: str) -> None:
    import torch.distributed as dist

    work_dir = Path(work)
    dist.init_process_group("gloo", init_method=f"file://{work_dir / 'rendezvous'}", rank=rank, world_size=world)
    try:
        torch.manual_seed(1000 + rank)  # different per rank: identical weights must come from the broadcasts
        t = _trainer(4, cpu_ddp=True)
        assert t.is_ddp and t.batch_size == 2 and t.unlabeled_batch_size == 2
        out = {"init": _states(t)}
        shared = torch.load(work_dir / "shared.pt", weights_only=False)
        _load_states(t, shared["init"])
        lo, hi = 2 * rank, 2 * rank + 2
        _step(t, _slice(shared["batch"], lo, hi), _slice(shared["unlabeled"], lo, hi))
        out["one_step"] = _states(t)
        t.cutmix_p, t.feature_dropout_p = 0.5, 0.5
        for i in range(N_LATER_STEPS):
            _step(t, *_make_batches(t, 2, seed=100 * rank + i))  # different data on each rank
        out["later"] = _states(t)
        torch.save(out, work_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_same(a: dict, b: dict, exact: bool, what: str) -> None:
    for part in a:
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            if exact:
                assert torch.equal(a[part][k], b[part][k]), f"{what}: {part}.{k} differs"
            else:
                torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-4, atol=1e-6,
                                           msg=lambda m, p=part, k=k: f"{what}: {p}.{k}: {m}")


def test_two_gloo_ranks_equal_one_process_and_stay_in_sync(planned, tmp_path):
    single = _trainer(4)
    assert not single.is_ddp and single.batch_size == 4 and single.unlabeled_batch_size == 4
    batch, unlabeled = _make_batches(single, 4, seed=0)
    init = _states(single)
    torch.save({"init": init, "batch": batch, "unlabeled": unlabeled}, tmp_path / "shared.pt")
    _step(single, batch, unlabeled)
    reference = _states(single)
    assert not torch.equal(reference["net"][next(iter(reference["net"]))], init["net"][next(iter(init["net"]))]) \
        or any(not torch.equal(reference["dfe"][k], init["dfe"][k]) for k in init["dfe"])

    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    _assert_same(r0["init"], r1["init"], exact=True, what="start (DDP + DFE broadcast, teacher = student)")
    _assert_same(r0["one_step"], r1["one_step"], exact=True, what="one step, rank 0 vs rank 1")
    _assert_same(r0["one_step"], reference, exact=False, what="one step, 2 ranks vs 1 process")
    _assert_same(r0["later"], r1["later"], exact=True, what=f"{N_LATER_STEPS} more steps, rank 0 vs rank 1")
