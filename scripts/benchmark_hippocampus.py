"""MSD Hippocampus, 3 labeled cases: supervised first, then semi-supervised, against supervised nnU-Net,
longer supervised training and nnU-Net self-training; 3 seeds. Prepares the data, then runs the general protocol
of ``benchmark_semisup.py`` on it (see there for the arms):

    python scripts/benchmark_hippocampus.py --work benchmark_output/hippocampus --sup-iterations 2000 \
        --semi-iterations 500

Split (fixed, from the sorted case names and ``--split-seed``): 40 test cases never used in training or tuning, 20
validation cases (learning curves, pseudo-label diagnostics, the learning-rate choice; never the test), 3 labeled
cases, the other 137 unlabeled. The reference (``full``) has every non-test case labeled (160). The raw datasets
under ``--work`` hold symlinks to ``--data``; nothing is copied. One plan for every dataset: configuration ``2d_cpu``
(4 stages, 16-128 features, batch 16, patch 56x40), planned on the 3-case dataset and moved to the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib as bl  # noqa: E402
import benchmark_semisup as bs  # noqa: E402

SEMI_ID, FULL_ID, SELF_ID0 = 40, 41, 42
CONFIG = "2d_cpu"
N_TEST, N_VAL, N_LABELED = 40, 20, 3


def split_cases(data: Path, split_seed: int) -> dict[str, list[str]]:
    cases = sorted(p.name[:-7] for p in (data / "labelsTr").glob("*.nii.gz"))
    if len(cases) < N_TEST + N_VAL + N_LABELED + 10:
        raise SystemExit(f"{data}/labelsTr: {len(cases)} cases, expected MSD Hippocampus (200)")
    for c in cases:
        if not (data / "imagesTr" / f"{c}.nii.gz").is_file():
            raise SystemExit(f"{data}/imagesTr/{c}.nii.gz missing (each label needs its image of the same name)")
    order = np.random.default_rng(split_seed).permutation(len(cases))
    picked = [cases[i] for i in order]
    return {"test": sorted(picked[:N_TEST]), "val": sorted(picked[N_TEST:N_TEST + N_VAL]),
            "labeled": sorted(picked[N_TEST + N_VAL:N_TEST + N_VAL + N_LABELED]),
            "unlabeled": sorted(picked[N_TEST + N_VAL + N_LABELED:])}


def build_raw(data: Path, split: dict[str, list[str]], work: Path) -> None:
    from nnunetv2_sss.datasets.label_budget import staged_raw_dataset, write_json

    ds = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "anterior": 1, "posterior": 2},
          "file_ending": ".nii.gz"}
    layouts = {SEMI_ID: ("Hippo3", {"imagesTr": split["labeled"], "imagesUnlabeled": split["unlabeled"],
                                    "imagesTs": split["test"], "imagesVal": split["val"]}),
               FULL_ID: ("HippoFull", {"imagesTr": split["labeled"] + split["unlabeled"] + split["val"]})}
    for ds_id, (name, folders) in layouts.items():
        if not bl.todo(work / f".raw_{ds_id}", f"raw Dataset{ds_id:03d}_{name} (symlinks to {data})"):
            continue
        with staged_raw_dataset(ds_id, name, overwrite=True) as tmp:
            for folder, cases in folders.items():
                (tmp / folder).mkdir()
                lab_folder = {"imagesTr": "labelsTr", "imagesTs": "labelsTs", "imagesVal": "labelsVal"}.get(folder)
                if lab_folder:
                    (tmp / lab_folder).mkdir()
                for c in cases:
                    bl.link_case(data / "imagesTr" / f"{c}.nii.gz", tmp / folder / f"{c}_0000.nii.gz")
                    if lab_folder:
                        bl.link_case(data / "labelsTr" / f"{c}.nii.gz", tmp / lab_folder / f"{c}.nii.gz")
            write_json({**ds, "numTraining": len(folders["imagesTr"]),
                        "description": f"MSD Hippocampus benchmark split: {name}"}, tmp / "dataset.json")
        (work / f".raw_{ds_id}").touch()


def plan(base: dict, work: Path, np_workers: int, batch: int) -> None:
    if bl.todo(work / ".planned", f"plan Dataset{SEMI_ID:03d}, add {CONFIG}, preprocess labeled + unlabeled"):
        log = work / "logs" / "plan.log"
        bl.run([bl.bin_cmd("nnUNetv2_extract_fingerprint"), "-d", str(SEMI_ID), "-np", str(np_workers)], base, log)
        bl.run([bl.bin_cmd("nnUNetv2_plan_experiment"), "-d", str(SEMI_ID)], base, log)
        bl.run([bl.bin_cmd("nnUNetv2_sss_add_config"), "-d", str(SEMI_ID), "--name", CONFIG, "--n-stages", "4",
                "--base-features", "16", "--max-features", "128", "--batch-size", str(batch), "--overwrite"],
               base, log)
        bl.run([bl.bin_cmd("nnUNetv2_preprocess"), "-d", str(SEMI_ID), "-c", CONFIG, "-np", str(np_workers)],
               base, log)
        bl.run([bl.bin_cmd("nnUNetv2_sss_preprocess_unlabeled"), "-d", str(SEMI_ID), "-c", CONFIG, "-np",
                str(np_workers)], base, log)
        (work / ".planned").touch()
    bl.prepare_copied_plans(SEMI_ID, FULL_ID, CONFIG, base, work, np_workers, f".planned_{FULL_ID}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=bl.ROOT.parent / "shared" / "data" / "Hippocampus")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--split-seed", type=int, default=2026)
    p.add_argument("-np", type=int, default=2, help="worker processes for preprocessing")
    bs.add_arguments(p)
    a = p.parse_args()
    if not a.data.is_dir():
        raise SystemExit(f"{a.data}: MSD Hippocampus not found (imagesTr/ and labelsTr/ with 200 .nii.gz pairs)")
    work = a.work.resolve()
    base = bl.bench_env(work, a.jobs, nnunet_folders_in_work=True)
    split = split_cases(a.data, a.split_seed)
    bl.write_atomic(work / "split.json", json.dumps(split, indent=1))
    build_raw(a.data, split, work)
    plan(base, work, a.np, a.batch_size)
    raw = bl.raw_folder(base, SEMI_ID)
    prot = bs.Protocol(SEMI_ID, CONFIG, raw / "imagesTs", raw / "labelsTs", a.sup_iterations, a.semi_iterations,
                       a.long_factor, FULL_ID, raw / "imagesVal", raw / "labelsVal", SELF_ID0,
                       **bs.protocol_options(a))
    bs.run_protocol(prot, a, base, f"MSD Hippocampus, {N_LABELED} labeled / {len(split['unlabeled'])} unlabeled "
                                   f"cases, {N_TEST} test cases never used in training or tuning")


if __name__ == "__main__":
    main()
