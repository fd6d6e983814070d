"""Shared fixtures: isolated nnU-Net folders per test and the licensed real data in ../shared/data (never copied)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NNUNET_SSS_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))

# Keep the 2-core CPU usable and nnU-Net quiet and in-process where it can be.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning
os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_def_n_proc", "1")

BIN = Path(sys.executable).parent
SAM2_TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"


def run_cli(env: dict[str, str], *cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    """Run one of the venv's console scripts (nnU-Net's or ours); on failure show the tail of its output."""
    if cmd[0] == "nnUNetv2_plan_and_preprocess":  # nnU-Net's planner sets torch threads from nnUNet_n_proc_DA
        env = {**env, "nnUNet_n_proc_DA": "1"}
    proc = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], env=env, capture_output=True, text=True)
    if ok and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@contextlib.contextmanager
def planned_synthetic(root: Path, dataset_id: int, n_labeled: int, n_unlabeled: int,
                      preprocess_unlabeled: bool = False) -> Iterator[tuple[dict[str, Path], Path]]:
    """A small synthetic dataset (2 slices of 32x32) planned and preprocessed (2d) by nnU-Net's own commands in
    fresh nnU-Net folders under ``root``; nnU-Net's variables point there (augmentation in-process) until the block
    ends. Yields the folders and the raw dataset."""
    from nnunetv2_sss.cli import ensure_ext_trainer_env

    dirs = {k: root / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for v in dirs.values():
        v.mkdir()
    old = {k: os.environ.get(k) for k in (*dirs, "nnUNet_extTrainer", "nnUNet_n_proc_DA")}
    os.environ.update({k: str(v) for k, v in dirs.items()})
    os.environ.update(nnUNet_extTrainer=ensure_ext_trainer_env(), nnUNet_n_proc_DA="0")
    try:
        from nnunetv2_sss.datasets.synthetic import make_synthetic_dataset  # after the variables: nnunetv2.paths

        raw = make_synthetic_dataset(dataset_id=dataset_id, n_labeled=n_labeled, n_unlabeled=n_unlabeled,
                                     n_test=0, shape=(2, 32, 32), overwrite=True)
        run_cli({**os.environ}, "nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "2d", "-np", "1")
        if preprocess_unlabeled:
            run_cli({**os.environ}, "nnUNetv2_sss_preprocess_unlabeled", "-d", str(dataset_id), "-c", "2d", "-np",
                    "1")
        yield dirs, raw
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def save_random_sam2_checkpoint(folder: Path, image_size: int) -> Path:
    """A real SAM-2.1 tiny with RANDOM weights, saved like the official file ({"model": state_dict}, official
    name), so it loads through the same code path as a real checkpoint. Geometry and plumbing only."""
    import torch
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2(SAM2_TINY, None, device="cpu", hydra_overrides_extra=[f"++model.image_size={image_size}"])
    path = folder / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _hash_memo_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the SAM-2 checkpoint-hash memo out of the user's ~/.cache (subprocesses inherit the variable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture
def nnunet_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Fresh nnUNet_raw / nnUNet_preprocessed / nnUNet_results for one test (nnU-Net reads them at use time)."""
    dirs = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in dirs.items():
        v.mkdir()
        monkeypatch.setenv(k, str(v))
    return dirs


@pytest.fixture(scope="session")
def acdc_dir() -> Path:
    d = SHARED_DATA / "ACDC"
    if not (d / "data").is_dir():
        pytest.skip(f"ACDC data not found at {d}: these tests need the licensed ACDC HDF5 data in ../shared/data/ACDC "
                    "(set NNUNET_SSS_SHARED_DATA to its parent folder)")
    return d


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    d = SHARED_DATA / "Hippocampus"
    if not (d / "imagesTr").is_dir():
        pytest.skip(f"MSD Hippocampus data not found at {d}: these tests need ../shared/data/Hippocampus "
                    "(set NNUNET_SSS_SHARED_DATA to its parent folder)")
    return d
