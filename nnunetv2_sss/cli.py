"""Entry points of the ``nnUNetv2_sss_*`` commands: parse arguments, call library functions, nothing more."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
from collections.abc import Callable
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


def cpu_friendly_env(env: dict[str, str]) -> dict[str, str]:
    """Defaults for running nnU-Net's commands from our scripts: no torch.compile (slow to start on a CPU), and
    idle OpenMP threads that sleep instead of spinning (spinning made steps ~20x slower on a busy 2-core CPU).
    Values already set by the user win."""
    env.setdefault("nnUNet_compile", "f")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


# Errors this package raises for bad input (they carry the advice in their message): shown as one message.
USER_ERROR_NAMES = frozenset({"UnlabeledDataError", "SAM2CheckpointError", "CheckpointError", "DatasetToolError",
                              "WarmStartError"})
TRACEBACK_ENV = "nnUNet_sss_traceback"


def _is_user_error(exc: BaseException) -> bool:
    """One of our input errors, or a ValueError raised by this package's own code (its settings checks)."""
    if type(exc).__name__ in USER_ERROR_NAMES and type(exc).__module__.startswith("nnunetv2_sss"):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    origin = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return type(exc) is ValueError and f"{os.sep}nnunetv2_sss{os.sep}" in origin


def install_user_error_hook() -> None:
    """Make a user error that stops a command before training (missing unlabeled folder, bad SAM-2 or resume
    checkpoint, region-based dataset) end as one clear message instead of the last line of a long traceback.
    Installed when the trainers are imported, so stock ``nnUNetv2_train`` gets it too; nnU-Net's own errors and
    everything else keep their traceback, and ``nnUNet_sss_traceback=1`` brings it back for ours."""
    if getattr(sys.excepthook, "_nnunetv2_sss", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb) -> None:
        if os.environ.get(TRACEBACK_ENV, "") in ("", "0") and _is_user_error(exc):
            print(f"\nnnunetv2-sss: {exc_type.__name__}: {exc}\n(set {TRACEBACK_ENV}=1 to see the traceback)",
                  file=sys.stderr, flush=True)
            return
        previous(exc_type, exc, tb)

    hook._nnunetv2_sss = True
    sys.excepthook = hook


def entry_point(entry: Callable[[], None]) -> Callable[[], None]:
    """A console command: our input errors end as one message (the hook is installed where the program starts)."""
    @functools.wraps(entry)
    def run() -> None:
        install_user_error_hook()
        entry()

    return run


@entry_point
def env_entry() -> None:
    """Print the shell line that makes stock nnU-Net commands find the SSS trainers."""
    argparse.ArgumentParser(description="Print 'export nnUNet_extTrainer=...' so that stock nnUNetv2_train and "
                                        "nnUNetv2_predict find the nnunetv2-sss trainers. Use: "
                                        "eval \"$(nnUNetv2_sss_env)\"").parse_args()
    print(f"export nnUNet_extTrainer={ensure_ext_trainer_env()}")


@entry_point
def train_entry() -> None:
    """``nnUNetv2_train`` with ``nnUNet_extTrainer`` set; every argument goes to nnU-Net unchanged."""
    ensure_ext_trainer_env()
    from nnunetv2.run.run_training import run_training_entry

    sys.argv[0] = "nnUNetv2_train"
    run_training_entry()


def _add_preprocessed_dataset_args(parser: argparse.ArgumentParser, several_configurations: bool) -> None:
    """-d / -c / -p as nnU-Net's own commands name them: which dataset, configuration(s) and plans."""
    parser.add_argument("-d", "--dataset", required=True, help="dataset name or id, e.g. 27 or Dataset027_ACDC")
    if several_configurations:
        parser.add_argument("-c", "--configurations", nargs="+", default=["2d"], help="configurations (default: 2d)")
    else:
        parser.add_argument("-c", "--configuration", default="2d", help="configuration (default: 2d)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")


@entry_point
def preprocess_unlabeled_entry() -> None:
    parser = argparse.ArgumentParser(
        description="Preprocess nnUNet_raw/DatasetXXX/imagesUnlabeled with the dataset's own plans and nnU-Net's own "
                    "preprocessor. Output: nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/.")
    _add_preprocessed_dataset_args(parser, several_configurations=True)
    parser.add_argument("-np", "--num_processes", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--force", action="store_true", help="redo even if the existing output is up to date")
    args = parser.parse_args()
    from nnunetv2_sss.unlabeled.preprocess import preprocess_unlabeled

    for c in args.configurations:
        out = preprocess_unlabeled(args.dataset, c, args.plans, num_processes=args.num_processes, force=args.force)
        print(f"unlabeled cases for configuration {c}: {out}")


@entry_point
def evaluate_entry() -> None:
    """``nnUNetv2_sss_evaluate GT_DIR PRED_DIR``: Dice / HD95 / ASD per case and class, with spacing from the files."""
    parser = argparse.ArgumentParser(
        description="Per-case, per-class Dice, HD95 and ASD (physical units, spacing read from the images) of the "
                    "predictions in PRED_DIR against the GT in GT_DIR, matched by file name. Writes per_case.csv, "
                    "summary.json and boxplot.png to OUT_DIR.")
    parser.add_argument("gt_dir", help="folder with the reference segmentations")
    parser.add_argument("pred_dir", help="folder with the predicted segmentations (same file names)")
    parser.add_argument("-o", "--output_folder", default=None,
                        help="output folder (default: PRED_DIR/sss_evaluation)")
    parser.add_argument("-l", "--dataset_json", default=None,
                        help="nnU-Net dataset.json: labels, label names, ignore label and file ending")
    parser.add_argument("--labels", type=int, nargs="+", default=None,
                        help="foreground labels to evaluate (default: dataset.json labels, else all non-zero "
                             "GT values)")
    parser.add_argument("--file_ending", default=None, help="e.g. .nii.gz (default: dataset.json or detected)")
    parser.add_argument("-np", "--num_processes", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument("--allow-missing", action="store_true", help="skip GT cases that have no prediction")
    args = parser.parse_args()
    from nnunetv2_sss.evaluation.metrics import evaluate_folders
    from nnunetv2_sss.evaluation.report import format_table

    summary = evaluate_folders(args.gt_dir, args.pred_dir, out_dir=args.output_folder, labels=args.labels,
                               dataset_json=args.dataset_json, num_processes=args.num_processes,
                               allow_missing=args.allow_missing, file_ending=args.file_ending)
    print(format_table(summary))
    out = args.output_folder or os.path.join(args.pred_dir, "sss_evaluation")
    print(f"results: {out}")


@entry_point
def cache_sam2_entry() -> None:
    """Encode every preprocessed unlabeled slice with SAM-2 once, so pseudo-label refreshes only decode prompts."""
    parser = argparse.ArgumentParser(
        description="Build the SAM-2 embedding cache (nnUNet_preprocessed/DatasetXXX/<data_identifier>_sam2_cache/) of "
                    "the preprocessed unlabeled cases in <data_identifier>_unlabeled/ (run "
                    "nnUNetv2_sss_preprocess_unlabeled first). Nothing is downloaded: the checkpoint is a local file. "
                    "Only cases whose preprocessed arrays changed (content hash) are encoded again; an interrupted "
                    "run resumes; concurrent runs wait for each other.")
    _add_preprocessed_dataset_args(parser, several_configurations=False)
    parser.add_argument("--checkpoint", default=None,
                        help="SAM-2 checkpoint file (default: env var nnUNet_sss_sam2_checkpoint)")
    parser.add_argument("--config", default=None,
                        help="SAM-2 Hydra config, e.g. configs/sam2.1/sam2.1_hiera_t.yaml (default: env var "
                             "nnUNet_sss_sam2_config, else from the checkpoint's file name or weights)")
    parser.add_argument("--image-size", type=int, default=1024, help="SAM input size (default: 1024)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=1, help="slices per encoder call (default: 1)")
    args = parser.parse_args()
    import torch

    from nnunetv2_sss.sam.backend import SAM2Backend, SAM2CheckpointError
    from nnunetv2_sss.sam.cache import build_sam2_cache_for_dataset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        backend = SAM2Backend(args.checkpoint, args.config, image_size=args.image_size, device=device)
    except SAM2CheckpointError as e:
        parser.exit(1, f"error: {e}\n")
    out = build_sam2_cache_for_dataset(args.dataset, args.configuration, backend, args.plans,
                                       batch_size=args.batch_size)
    print(f"SAM-2 cache ({backend.config_name}, {backend.image_size}px): {out}")


@entry_point
def add_config_entry() -> None:
    parser = argparse.ArgumentParser(
        description="Add a smaller configuration to a dataset's plans (nnU-Net 'inherits_from'), e.g. for CPU "
                    "experiments: nnUNetv2_sss_add_config -d 27 --name 2d_small --n-stages 5 --base-features 16 "
                    "--max-features 256 --batch-size 8")
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("--name", required=True, help="name of the new configuration")
    parser.add_argument("--from", dest="parent", default="2d", help="configuration to inherit from (default 2d)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("--n-stages", type=int)
    parser.add_argument("--base-features", type=int)
    parser.add_argument("--max-features", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--spacing", type=float, nargs="+", help="new target spacing (needs its own preprocessing)")
    parser.add_argument("--patch-size", type=int, nargs="+", help="new patch size (needs its own preprocessing)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    from nnunetv2_sss.training.plans_config import add_configuration

    plans_file, own_data = add_configuration(
        args.dataset, args.name, args.parent, args.plans, args.n_stages, args.base_features, args.max_features,
        args.batch_size, args.spacing, args.patch_size, args.overwrite)
    print(f"Added configuration '{args.name}' to {plans_file}")
    if own_data:
        print(f"It has its own spacing/patch size: run nnUNetv2_preprocess -d {args.dataset} -c {args.name} "
              f"-plans_name {args.plans} (and nnUNetv2_sss_preprocess_unlabeled -d {args.dataset} -c {args.name}).")
    else:
        print(f"It reuses the preprocessed data of '{args.parent}'.")


def _add_output_dataset_args(parser: argparse.ArgumentParser, name_default: str | None, name_help: str) -> None:
    parser.add_argument("--name", default=name_default, help=name_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the new id")


def _run_dataset_tool(parser: argparse.ArgumentParser, make: Callable[[argparse.Namespace], Path],
                      what: str) -> None:
    """Parse the arguments and write the dataset; a ``DatasetToolError`` (bad input) ends with its message, exit 1."""
    args = parser.parse_args()
    from nnunetv2_sss.datasets.label_budget import DatasetToolError

    try:
        out = make(args)
    except DatasetToolError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"{what}: {out}")


@entry_point
def make_synthetic_entry() -> None:
    """``nnUNetv2_sss_make_synthetic``: the generated cardiac-like dataset, so a demo needs no download."""
    parser = argparse.ArgumentParser(
        description="Write a small synthetic cardiac-like dataset (labels RV/MYO/LV look-alikes, spacing 5x1.5x1.5 "
                    "mm) to nnUNet_raw: imagesTr/labelsTr, imagesUnlabeled, imagesTs/labelsTs.")
    parser.add_argument("-d", "--dataset_id", type=int, default=990, help="dataset id (default: 990)")
    parser.add_argument("--n_labeled", type=int, default=6, help="labeled training cases (default: 6)")
    parser.add_argument("--n_unlabeled", type=int, default=16, help="unlabeled cases (default: 16)")
    parser.add_argument("--n_test", type=int, default=6, help="test cases with labels (default: 6)")
    parser.add_argument("--shape", type=int, nargs=3, default=(6, 64, 64), metavar=("Z", "Y", "X"),
                        help="volume shape (default: 6 64 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_output_dataset_args(parser, "SSSSynthetic", "dataset name (default: SSSSynthetic)")

    def make(args: argparse.Namespace) -> Path:
        from nnunetv2_sss.datasets.synthetic import make_synthetic_dataset

        return make_synthetic_dataset(args.dataset_id, args.name, args.n_labeled, args.n_unlabeled, args.n_test,
                                      args.seed, tuple(args.shape), args.overwrite)

    _run_dataset_tool(parser, make, "synthetic dataset")


@entry_point
def label_budget_entry() -> None:
    """``nnUNetv2_sss_label_budget``: a copy of a raw dataset where only some cases (or patients) keep labels."""
    parser = argparse.ArgumentParser(
        description="Copy nnU-Net raw dataset D to NEW_ID keeping labels only for the chosen cases; the other "
                    "training cases move to imagesUnlabeled/. Example: nnUNetv2_sss_label_budget -d 27 -o 127 --n 3 "
                    "--group-regex '(patient\\d+)'")
    parser.add_argument("-d", "--dataset", required=True, help="source dataset name or id")
    parser.add_argument("-o", "--new_id", type=int, required=True, help="id of the new dataset")
    sel = parser.add_mutually_exclusive_group(required=True)
    sel.add_argument("--n", type=int, help="number of cases (groups with --group-regex) to keep labeled")
    sel.add_argument("--fraction", type=float, help="fraction of cases (groups) to keep labeled, in (0, 1]")
    sel.add_argument("--cases", nargs="+", help="case ids (or group keys with --group-regex) to keep labeled")
    parser.add_argument("--group-regex", default=None,
                        help="regex whose first group names a case's group (e.g. patient); groups are chosen whole")
    parser.add_argument("--seed", type=int, default=0, help="random seed for --n / --fraction (default: 0)")
    _add_output_dataset_args(parser, None, "name of the new dataset (default: <source>_<k>cases|groups)")

    def make(args: argparse.Namespace) -> Path:
        from nnunetv2_sss.datasets.label_budget import make_label_budget

        return make_label_budget(args.dataset, args.new_id, n=args.n, fraction=args.fraction, cases=args.cases,
                                 group_regex=args.group_regex, seed=args.seed, name=args.name,
                                 overwrite=args.overwrite)

    _run_dataset_tool(parser, make, "label-budget dataset")


@entry_point
def convert_acdc_entry() -> None:
    """``nnUNetv2_sss_convert_acdc``: SSL4MIS-style ACDC HDF5 -> nnU-Net raw with a standard low-label split."""
    parser = argparse.ArgumentParser(
        description="Convert ACDC in the SSL4MIS/UniMatch HDF5 layout (data/, train.list, val.list) to an nnU-Net raw "
                    "dataset: labeled patients -> imagesTr/labelsTr, other training patients -> imagesUnlabeled, "
                    "validation volumes -> imagesTs/labelsTs. Spacing (z,y,x) = (10, 1, 1): the files store none.")
    parser.add_argument("-i", "--input", required=True, help="ACDC folder holding data/, train.list and val.list")
    parser.add_argument("-d", "--dataset_id", type=int, default=27, help="dataset id (default: 27)")
    parser.add_argument("--labeled", required=True,
                        help="labeled patients: 1, 3 or 7 (standard splits), all, or a comma list such as 38,50,99 "
                             "(one patient: patient005)")
    _add_output_dataset_args(parser, None, "dataset name (default: ACDC or ACDC_<k>labeled)")

    def make(args: argparse.Namespace) -> Path:
        from nnunetv2_sss.datasets.acdc import convert_acdc

        return convert_acdc(Path(args.input), args.dataset_id, args.labeled, args.name, args.overwrite)

    _run_dataset_tool(parser, make, "ACDC dataset")
