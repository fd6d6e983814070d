"""ACDC, 3 labeled patients (038, 050, 099): supervised first, then semi-supervised, against the controls.

Prepares the data, then runs the general protocol of ``benchmark_semisup.py`` (see there for the arms):

    python scripts/benchmark_acdc.py --work benchmark_output/acdc --sup-iterations 3000 --semi-iterations 600 \\
        --seeds 0 1 --arms sup sss_ws selftrain full sup_2B

Data: ACDC converted to nnU-Net raw twice (3 labeled patients + the other 67 as unlabeled; all 70 labeled as the
reference), the 20 validation volumes (10 patients) as the test set: no tuning is done on ACDC (settings come from
the Hippocampus validation split). One plan (from the 3-patient dataset) shared by every dataset; configuration
``2d_small`` (5 stages, 16-256 features, batch 8, in-plane spacing 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib as bl  # noqa: E402
import benchmark_semisup as bs  # noqa: E402

SEMI_ID, FULL_ID, SELF_ID0 = 27, 28, 30
CONFIG = "2d_small"


def prepare(acdc: Path, base: dict[str, str], work: Path, np_workers: int) -> None:
    from nnunetv2_sss.datasets.acdc import convert_acdc

    for ds_id, labeled in ((SEMI_ID, "3"), (FULL_ID, "all")):
        if bl.todo(work / f".converted_{ds_id}", f"convert ACDC (labeled={labeled}) -> Dataset{ds_id:03d}"):
            convert_acdc(acdc, dataset_id=ds_id, labeled=labeled, overwrite=True)
            (work / f".converted_{ds_id}").touch()
    log = work / "logs" / "plan.log"
    if bl.todo(work / ".planned", f"plan, add {CONFIG}, preprocess labeled + unlabeled"):
        bl.run([bl.bin_cmd("nnUNetv2_extract_fingerprint"), "-d", str(SEMI_ID), "-np", str(np_workers)], base, log)
        bl.run([bl.bin_cmd("nnUNetv2_plan_experiment"), "-d", str(SEMI_ID)], base, log)
        bl.run([bl.bin_cmd("nnUNetv2_sss_add_config"), "-d", str(SEMI_ID), "--name", CONFIG, "--n-stages", "5",
                "--base-features", "16", "--max-features", "256", "--batch-size", "8", "--spacing", "2", "2",
                "--overwrite"], base, log)
        bl.run([bl.bin_cmd("nnUNetv2_preprocess"), "-d", str(SEMI_ID), "-c", CONFIG, "-np", str(np_workers)],
               base, log)
        bl.run([bl.bin_cmd("nnUNetv2_sss_preprocess_unlabeled"), "-d", str(SEMI_ID), "-c", CONFIG, "-np",
                str(np_workers)], base, log)
        (work / ".planned").touch()
    bl.prepare_copied_plans(SEMI_ID, FULL_ID, CONFIG, base, work, np_workers, f".planned_{FULL_ID}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acdc", type=Path, default=bl.ROOT.parent / "shared" / "data" / "ACDC")
    p.add_argument("-np", type=int, default=2, help="worker processes for preprocessing")
    bs.add_arguments(p)
    a = p.parse_args()
    if not (a.acdc / "data").is_dir():
        raise SystemExit(f"{a.acdc}: ACDC not found (data/, train.list, val.list in the SSL4MIS layout)")
    work = a.work.resolve()
    base = bl.bench_env(work, a.jobs, nnunet_folders_in_work=True)
    prepare(a.acdc, base, work, a.np)
    raw = bl.raw_folder(base, SEMI_ID)
    prot = bs.Protocol(SEMI_ID, CONFIG, raw / "imagesTs", raw / "labelsTs", a.sup_iterations, a.semi_iterations,
                       a.long_factor, FULL_ID, None, None, SELF_ID0, **bs.protocol_options(a))
    bs.run_protocol(prot, a, base, "ACDC, 3 labeled patients (6 volumes) / 134 unlabeled volumes, the 20 "
                                   "validation volumes as test")


if __name__ == "__main__":
    main()
