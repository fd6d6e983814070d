"""Entry points of the ``nnUNetv2_sss_*`` commands: parse arguments, call library functions, nothing more."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path


def ext_trainer_folder() -> Path:
    """Folder of the thin trainer shims for ``nnUNet_extTrainer``.

    ``trainers/`` in a checkout ships as ``nnunetv2_sss.ext_trainers`` in a wheel; asking the import system
    for that package finds the right folder in both cases (editable or not).
    """
    spec = importlib.util.find_spec("nnunetv2_sss.ext_trainers")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve()
    checkout = Path(__file__).resolve().parent.parent / "trainers"
    if checkout.is_dir():
        return checkout
    raise RuntimeError("Cannot find the nnunetv2_sss trainer shims (nnunetv2_sss.ext_trainers). Reinstall the "
                       "package: pip install nnunetv2-sss (or pip install -e . in a checkout).")


def ensure_ext_trainer_env() -> str:
    """Add our shim folder to ``nnUNet_extTrainer`` (keeping the user's own folders) and return the new value."""
    folder = str(ext_trainer_folder())
    current = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    if folder not in current:
        current.append(folder)
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(current)
    return os.environ["nnUNet_extTrainer"]


def env_entry() -> None:
    """Print the shell line that makes stock nnU-Net commands find the SSS trainers."""
    argparse.ArgumentParser(description="Print 'export nnUNet_extTrainer=...' so that stock nnUNetv2_train and "
                                        "nnUNetv2_predict find the nnunetv2-sss trainers. Use: "
                                        "eval \"$(nnUNetv2_sss_env)\"").parse_args()
    print(f"export nnUNet_extTrainer={ensure_ext_trainer_env()}")


def train_entry() -> None:
    """``nnUNetv2_train`` with ``nnUNet_extTrainer`` set; every argument goes to nnU-Net unchanged."""
    ensure_ext_trainer_env()
    from nnunetv2.run.run_training import run_training_entry

    sys.argv[0] = "nnUNetv2_train"
    run_training_entry()


def preprocess_unlabeled_entry() -> None:
    parser = argparse.ArgumentParser(
        description="Preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled with the dataset's own plans and nnU-Net's own "
                    "preprocessor. Output: nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/.")
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id, e.g. 27 or Dataset027_ACDC")
    parser.add_argument("-c", "--configurations", nargs="+", default=["2d"], help="configurations (default: 2d)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--force", action="store_true", help="redo even if the existing output is up to date")
    args = parser.parse_args()
    from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled

    for c in args.configurations:
        out = preprocess_unlabeled(args.dataset, c, args.plans, num_processes=args.num_processes, force=args.force)
        print(f"unlabeled cases for configuration {c}: {out}")
