"""ACDC, 3 labeled patients (038, 050, 099): supervised first, then semi-supervised, against the controls.

Prepares the data, then runs the general protocol of ``benchmark_semisup.py`` (see there for the arms):

    python scripts/benchmark_acdc.py --work benchmark_output/acdc --sup-iterations 4000 --semi-iterations 3000 \\
        --seeds 0 1 2 --arms sup sss_ws selftrain full sup_2B

Data: ACDC converted to nnU-Net raw twice (3 labeled patients + the other 67 as unlabeled; all 70 labeled as the
reference), the 20 validation volumes (10 patients) as the test set: no tuning is done on ACDC (settings come from
the Hippocampus validation split). One plan (from the 3-patient dataset) shared by every dataset, with a CPU-sized
configuration added to it (``--configuration``): ``2d_cpu`` (the default: 4 stages, 16-128 features, batch 8, patch
96x96 at in-plane spacing 2, the same network as Hippocampus' ``2d_cpu``) or ``2d_small`` (5 stages, 16-256 features,
batch 8, patch 128x128 at spacing 2: the configuration of the first ACDC runs, about twice the cost per iteration).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib as bl  # noqa: E402
import benchmark_semisup as bs  # noqa: E402

SEMI_ID, FULL_ID, SELF_ID0 = 27, 28, 30
# nnUNetv2_sss_add_config arguments of each CPU-sized configuration (spacing in ACDC's pixel units: the HDF5 files
# carry no spacing, and one pixel is about 1.4-1.7 mm)
CONFIGS = {
    "2d_cpu": ["--n-stages", "4", "--base-features", "16", "--max-features", "128", "--batch-size", "8",
               "--spacing", "2", "2", "--patch-size", "96", "96"],
    "2d_small": ["--n-stages", "5", "--base-features", "16", "--max-features", "256", "--batch-size", "8",
                 "--spacing", "2", "2"],
}


def claim_work_folder(work: Path, config: str) -> None:
    """One configuration per work folder: run names, predictions, self-training datasets and reports do not carry
    it. A folder of the first ACDC runs (before this stamp: ``.planned_28``) holds ``2d_small``."""
    stamp = work / "configuration.txt"
    if not stamp.is_file() and (work / ".planned_28").exists():
        for marker in (".configured_2d_small", ".planned_28_2d_small"):
            (work / marker).touch()
        bl.write_atomic(stamp, "2d_small\n")
    held = stamp.read_text().strip() if stamp.is_file() else config
    if held != config:
        raise SystemExit(f"{work} holds runs of configuration {held!r}, not {config!r}: give --configuration {held} "
                         f"or another --work folder")
    bl.write_atomic(stamp, config + "\n")


def prepare(acdc: Path, base: dict[str, str], work: Path, np_workers: int, config: str) -> None:
    from nnunetv2_sss.datasets.acdc import convert_acdc

    claim_work_folder(work, config)
    for ds_id, labeled in ((SEMI_ID, "3"), (FULL_ID, "all")):
        if bl.todo(work / f".converted_{ds_id}", f"convert ACDC (labeled={labeled}) -> Dataset{ds_id:03d}"):
            convert_acdc(acdc, dataset_id=ds_id, labeled=labeled, overwrite=True)
            (work / f".converted_{ds_id}").touch()
    log = work / "logs" / "plan.log"
    # planning rewrites nnUNetPlans.json (dropping added configurations), so it runs once per work folder
    if bl.todo(work / ".planned", "fingerprint and plan"):
        bl.run([bl.bin_cmd("nnUNetv2_extract_fingerprint"), "-d", str(SEMI_ID), "-np", str(np_workers)], base, log)
        bl.run([bl.bin_cmd("nnUNetv2_plan_experiment"), "-d", str(SEMI_ID)], base, log)
        (work / ".planned").touch()
    if bl.todo(work / f".configured_{config}", f"add {config}, preprocess labeled + unlabeled"):
        bl.run([bl.bin_cmd("nnUNetv2_sss_add_config"), "-d", str(SEMI_ID), "--name", config, *CONFIGS[config],
                "--overwrite"], base, log)
        bl.run([bl.bin_cmd("nnUNetv2_preprocess"), "-d", str(SEMI_ID), "-c", config, "-np", str(np_workers)],
               base, log)
        bl.run([bl.bin_cmd("nnUNetv2_sss_preprocess_unlabeled"), "-d", str(SEMI_ID), "-c", config, "-np",
                str(np_workers)], base, log)
        (work / f".configured_{config}").touch()
    bl.prepare_copied_plans(SEMI_ID, FULL_ID, config, base, work, np_workers, f".planned_{FULL_ID}_{config}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acdc", type=Path, default=bl.ROOT.parent / "shared" / "data" / "ACDC")
    p.add_argument("-np", type=int, default=2, help="worker processes for preprocessing")
    p.add_argument("--configuration", choices=sorted(CONFIGS), default="2d_cpu",
                   help="the CPU-sized configuration (default 2d_cpu; 2d_small: the first ACDC runs')")
    bs.add_arguments(p)
    a = p.parse_args()
    if not (a.acdc / "data").is_dir():
        raise SystemExit(f"{a.acdc}: ACDC not found (data/, train.list, val.list in the SSL4MIS layout)")
    work = a.work.resolve()
    base = bl.bench_env(work, a.jobs, nnunet_folders_in_work=True)
    prepare(a.acdc, base, work, a.np, a.configuration)
    raw = bl.raw_folder(base, SEMI_ID)
    prot = bs.Protocol(SEMI_ID, a.configuration, raw / "imagesTs", raw / "labelsTs", a.sup_iterations,
                       a.semi_iterations, a.long_factor, FULL_ID, None, None, SELF_ID0, **bs.protocol_options(a))
    bs.run_protocol(prot, a, base, "ACDC, 3 labeled patients (6 volumes) / 134 unlabeled volumes, the 20 "
                                   "validation volumes as test")


if __name__ == "__main__":
    main()
