"""Shared fixtures: isolated nnU-Net folders per test and the licensed real data in ../shared/data (never copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NNUNET_SSS_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))

# Keep the 2-core CPU usable and nnU-Net quiet and in-process where it can be.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning
os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("nnUNet_def_n_proc", "1")


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
