"""The main job on the embedded synthetic dataset, with the real nnU-Net commands, on the CPU, in a few minutes.

make the dataset -> nnUNetv2_plan_and_preprocess -> a small configuration (nnUNetv2_sss_add_config) ->
nUNetv2_sss_preprocess_unlabeled -> nnUNetv2_train with a
short SSS variant (stock command, trainer found through nnUNet_extTrainer) -> nnUNetv2_predict on the test
images -> nnUNetv2_evaluate_folder -> where everything is. Every command is printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "2d_demo"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=ROOT / "demo_output")
    p.add_argument("--trainer", default="nnUNetTrainerSSS_noSAM_demo")
    p.add_argument("--dataset-id", type=int, default=990)
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    a = p.parse_args()
    out = a.out.resolve()
    if a.fresh:
        shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[k] = str(out / k)
        Path(env[k]).mkdir(parents=True, exist_ok=True)
    env.setdefault("nnUNet_n_proc_DA", "1")
    env.setdefault("nnUNet_def_n_proc", "1")
    from nnunetv2_sss.cli import cpu_friendly_env, ensure_ext_trainer_env

    os.environ.update(cpu_friendly_env(env))
    from nnunetv2_sss.datasets.synthetic import make_synthetic_dataset

    env["nnUNet_extTrainer"] = ensure_ext_trainer_env()
    bindir = Path(sys.executable).parent

    def run(*cmd: str) -> None:
        exe = bindir / cmd[0]
        print(f"\n$ {' '.join(cmd)}", flush=True)
        subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], env=env, check=True)

    t0 = time.time()
    d = a.dataset_id
    raw = make_synthetic_dataset(dataset_id=d, overwrite=True)
    print(f"synthetic dataset: {raw}")
    # one process each for fingerprinting and preprocessing: 6 small cases do not pay for 8 spawned interpreters
    run("nnUNetv2_plan_and_preprocess", "-d", str(d), "-c", "2d", "-npfp", "1", "-np", "1",
        "--verify_dataset_integrity")
    # the planner's 2d network (5 stages, 32-512 features) is sized for a GPU; 64x64 synthetic slices need far less:
    # a configuration that inherits 2d's preprocessing with 4 stages of 16-128 features
    run("nnUNetv2_sss_add_config", "-d", str(d), "--name", CONFIG, "--n-stages", "4", "--base-features", "16",
        "--max-features", "128")
    run("nnUNetv2_sss_preprocess_unlabeled", "-d", str(d), "-c", CONFIG, "-np", "1")
    run("nnUNetv2_train", str(d), CONFIG, "0", "-tr", a.trainer, "-device", "cpu")
    pred = out / "predictions"
    shutil.rmtree(pred, ignore_errors=True)
    run("nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(d), "-c", CONFIG, "-f", "0",
        "-tr", a.trainer, "-npp", "1", "-nps", "1", "-device", "cpu")
    run("nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(pred), "-djfile", str(pred / "dataset.json"),
        "-pfile", str(pred / "plans.json"))
    summary = json.loads((pred / "summary.json").read_text())
    fold = out / "nnUNet_results" / raw.name / f"{a.trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
    print(f"\nDone in {time.time() - t0:.0f} s.")
    print(f"  trained model + progress.png, progress_semi.png + training log: {fold}")
    print(f"  test-set predictions: {pred}")
    print(f"  nnU-Net evaluation: {pred / 'summary.json'} (mean foreground Dice "
          f"{summary['foreground_mean']['Dice']:.3f} on {len(summary['metric_per_case'])} synthetic test cases)")


if __name__ == "__main__":
    main()
