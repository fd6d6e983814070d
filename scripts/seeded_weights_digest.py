"""Digest of the weights after a short seeded training run: proof that a refactoring changed no behaviour.

Run it before and after a change; the digests must be equal (same machine, same torch):

    python scripts/seeded_weights_digest.py -tr nnUNetTrainerSSS_noSAM_EMA nnUNetTrainerUniMatch

A synthetic dataset is made, planned and preprocessed in a temporary folder; each trainer trains 2 epochs x 3
iterations from scratch with ``nnUNet_sss_seed`` and augmentation in the process (``nnUNet_n_proc_DA=0``, one
thread), with the supervised warm-up at its default (so both the warm-up and the semi-supervised step run). Prints
one SHA-256 per trainer over the network weights and the checkpoint's ``sss_state`` tensors.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def digest(state: object, h: hashlib._Hash) -> None:
    if isinstance(state, torch.Tensor):
        h.update(state.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(state, dict):
        for k in sorted(state, key=str):
            h.update(str(k).encode())
            digest(state[k], h)
    elif isinstance(state, (list, tuple)):
        for v in state:
            digest(v, h)
    elif isinstance(state, (int, float, str, bool)) or state is None:
        h.update(repr(state).encode())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-tr", nargs="+", default=["nnUNetTrainerSSS_noSAM_EMA"])
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args()
    from nnunetv2_sss.cli import ensure_ext_trainer_env

    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "nnUNet_compile": "f", "OMP_NUM_THREADS": "1", "nnUNet_def_n_proc": "1"}
        for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / k).mkdir()
            env[k] = os.environ[k] = str(root / k)
        env["nnUNet_extTrainer"] = ensure_ext_trainer_env()
        from nnunetv2_sss.datasets.synthetic import make_synthetic_dataset

        make_synthetic_dataset(dataset_id=983, n_labeled=4, n_unlabeled=3, n_test=0, shape=(2, 32, 32), overwrite=True)
        for cmd in (["nnUNetv2_plan_and_preprocess", "-d", "983", "-c", "2d", "-np", "1"],
                    ["nnUNetv2_sss_preprocess_unlabeled", "-d", "983", "-c", "2d", "-np", "1"]):
            subprocess.run([str(bin_dir / cmd[0]), *cmd[1:]], env={**env, "nnUNet_n_proc_DA": "1"}, check=True,
                           capture_output=True)
        for trainer in a.tr:
            run_env = {**env, "nnUNet_n_proc_DA": "0", "nnUNet_sss_seed": str(a.seed), "nnUNet_sss_num_epochs": "2",
                       "nnUNet_sss_iterations_per_epoch": "3", "nnUNet_sss_val_iterations_per_epoch": "1",
                       "nnUNet_sss_skip_final_validation": "1"}
            subprocess.run([str(bin_dir / "nnUNetv2_train"), "983", "2d", "all", "-tr", trainer, "-device", "cpu"],
                           env=run_env, check=True, capture_output=True)
            ck = next((root / "nnUNet_results").rglob(f"{trainer}__*/fold_all/checkpoint_final.pth"))
            state = torch.load(ck, map_location="cpu", weights_only=False)
            h = hashlib.sha256()
            digest({"network": state["network_weights"], "sss": state.get("sss_state")}, h)
            print(f"{trainer}: {h.hexdigest()}", flush=True)


if __name__ == "__main__":
    main()
