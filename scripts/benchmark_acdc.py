"""ACDC, 3 labeled patients (038, 050, 099): semi-supervised vs supervised nnU-Net at an equal iteration budget.

One command, resumable (every finished step is skipped on a rerun), with progress shown:

    python scripts/benchmark_acdc.py --acdc ../shared/data/ACDC --work benchmark_output/acdc

Steps: convert ACDC to nnU-Net raw twice (3 labeled patients + the other 67 as unlabeled; all 70 labeled as the
reference) -> plan once on the 3-patient dataset and give the reference the same plans -> add a CPU-sized
configuration (``2d_small``: 5 stages, 16-256 features, batch 8, in-plane spacing 2) -> preprocess -> train
``nnUNetTrainer_budget`` (stock nnUNetTrainer with the budget below), ``nnUNetTrainerUniMatch`` and
``nnUNetTrainerSSS_noSAM`` on the 3 patients, and ``nnUNetTrainer_budget`` on all 70 patients, all on fold
``all`` with the same seed-free nnU-Net defaults and the same number of iterations -> predict the 20 validation
volumes with the final checkpoint (no selection on them; ``--disable_tta`` for every model alike) -> Dice / HD95
per class -> ``results.md``, ``results.json``, ``results.png`` and the gap-closure ratio
(semi - sup3) / (supFull - sup3). ``--budget`` scales the iteration count (e.g. 4 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_lib import bin_cmd, run  # noqa: E402
from bench_lib import todo as step  # noqa: E402

SEMI_ID, FULL_ID = 27, 28
CONFIG = "2d_small"
DEFAULT_ITERATIONS = 1500  # at budget 1: about two hours for the whole script on a 2-core CPU
ITERS_PER_EPOCH = 50
RUNS = [  # (label, dataset id, trainer)
    ("sup3", SEMI_ID, "nnUNetTrainer_budget"),
    ("unimatch3", SEMI_ID, "nnUNetTrainerUniMatch"),
    ("sss_noSAM3", SEMI_ID, "nnUNetTrainerSSS_noSAM"),
    ("supFull", FULL_ID, "nnUNetTrainer_budget"),
]
CLASSES = {"1": "RV", "2": "MYO", "3": "LV"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acdc", type=Path, default=ROOT.parent / "shared" / "data" / "ACDC")
    p.add_argument("--work", type=Path, default=ROOT / "benchmark_output" / "acdc")
    p.add_argument("--budget", type=float, default=1.0, help=f"x {DEFAULT_ITERATIONS} training iterations")
    p.add_argument("--device", default="cpu")
    p.add_argument("-np", type=int, default=2, help="worker processes for preprocessing")
    a = p.parse_args()
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    iterations = max(ITERS_PER_EPOCH, int(round(DEFAULT_ITERATIONS * a.budget / ITERS_PER_EPOCH)) * ITERS_PER_EPOCH)
    from nnunetv2_sss.cli import cpu_friendly_env, ensure_ext_trainer_env

    env = cpu_friendly_env(dict(os.environ))
    env.update(nnUNet_raw=str(work / "nnUNet_raw"), nnUNet_preprocessed=str(work / "nnUNet_preprocessed"),
               nnUNet_results=str(work / "nnUNet_results"),
               nnUNet_def_n_proc=str(a.np), nnUNet_n_proc_DA=env.get("nnUNet_n_proc_DA", "2"),
               nnUNet_sss_num_epochs=str(iterations // ITERS_PER_EPOCH),
               nnUNet_sss_iterations_per_epoch=str(ITERS_PER_EPOCH), nnUNet_sss_val_iterations_per_epoch="5")
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[k]).mkdir(exist_ok=True)
    os.environ.update(env)
    env["nnUNet_extTrainer"] = ensure_ext_trainer_env()
    t0 = time.time()

    # 1. data
    from nnunetv2_sss.datasets.acdc import convert_acdc

    for ds_id, labeled in ((SEMI_ID, "3"), (FULL_ID, "all")):
        if step(work / f".converted_{ds_id}", f"convert ACDC (labeled={labeled}) -> Dataset{ds_id:03d}"):
            convert_acdc(a.acdc, dataset_id=ds_id, labeled=labeled, overwrite=True)
            (work / f".converted_{ds_id}").touch()

    # 2. plans: one plan (from the 3-patient dataset), shared by both datasets; CPU-sized configuration
    if step(work / ".planned", "plan, add 2d_small, preprocess"):
        run([bin_cmd("nnUNetv2_extract_fingerprint"), "-d", str(SEMI_ID), "-np", str(a.np)], env, logs / "plan.log")
        run([bin_cmd("nnUNetv2_plan_experiment"), "-d", str(SEMI_ID)], env, logs / "plan.log")
        run([bin_cmd("nnUNetv2_sss_add_config"), "-d", str(SEMI_ID), "--name", CONFIG, "--n-stages", "5",
             "--base-features", "16", "--max-features", "256", "--batch-size", "8", "--spacing", "2", "2",
             "--overwrite"], env, logs / "plan.log")
        run([bin_cmd("nnUNetv2_extract_fingerprint"), "-d", str(FULL_ID), "-np", str(a.np)], env, logs / "plan.log")
        run([bin_cmd("nnUNetv2_move_plans_between_datasets"), "-s", str(SEMI_ID), "-t", str(FULL_ID),
             "-sp", "nnUNetPlans", "-tp", "nnUNetPlans"], env, logs / "plan.log")
        full_name = next(Path(env["nnUNet_raw"]).glob(f"Dataset{FULL_ID:03d}_*")).name
        shutil.copy(Path(env["nnUNet_raw"]) / full_name / "dataset.json",  # as nnUNetv2_plan_experiment would
                    Path(env["nnUNet_preprocessed"]) / full_name / "dataset.json")
        for ds_id in (SEMI_ID, FULL_ID):
            run([bin_cmd("nnUNetv2_preprocess"), "-d", str(ds_id), "-c", CONFIG, "-np", str(a.np)], env,
                logs / "plan.log")
        run([bin_cmd("nnUNetv2_sss_preprocess_unlabeled"), "-d", str(SEMI_ID), "-c", CONFIG, "-np", str(a.np)],
            env, logs / "plan.log")
        (work / ".planned").touch()

    # 3. train (resumes an interrupted run with --c)
    results_root = Path(env["nnUNet_results"])
    train_seconds = {}
    for label, ds_id, trainer in RUNS:
        fold_dir = next(results_root.glob(f"Dataset{ds_id:03d}_*"), results_root / "none") / \
            f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_all"
        if (fold_dir / "checkpoint_final.pth").exists():
            print(f"[skip] train {label} (done earlier)", flush=True)
            continue
        print(f"[....] train {label}: {trainer} on Dataset{ds_id:03d}, {iterations} iterations", flush=True)
        cmd = [bin_cmd("nnUNetv2_train"), str(ds_id), CONFIG, "all", "-tr", trainer, "-device", a.device]
        if (fold_dir / "checkpoint_latest.pth").exists():
            cmd.append("--c")
        start = time.time()
        run(cmd, env, logs / f"train_{label}.log")
        train_seconds[label] = time.time() - start

    # 4. predict the validation volumes with the final checkpoint, 5. evaluate
    from nnunetv2_sss.evaluation.metrics import evaluate_folders

    raw_semi = next(Path(env["nnUNet_raw"]).glob(f"Dataset{SEMI_ID:03d}_*"))
    summaries = {}
    for label, ds_id, trainer in RUNS:
        pred = work / "predictions" / label
        if step(pred / ".done", f"predict {label}"):
            shutil.rmtree(pred, ignore_errors=True)
            run([bin_cmd("nnUNetv2_predict"), "-i", str(raw_semi / "imagesTs"), "-o", str(pred), "-d", str(ds_id),
                 "-c", CONFIG, "-f", "all", "-tr", trainer, "-chk", "checkpoint_final.pth", "--disable_tta",
                 "-npp", "1", "-nps", "1", "-device", a.device], env, logs / f"predict_{label}.log")
            (pred / ".done").touch()
        summaries[label] = evaluate_folders(raw_semi / "labelsTs", pred, out_dir=work / "evaluation" / label,
                                            dataset_json=raw_semi / "dataset.json")

    # 6. report
    def dice(label: str, cls: str | None = None) -> float:
        s = summaries[label]
        return s["foreground_mean"]["dice"] if cls is None else s["per_class"][cls]["dice"]["mean"]

    gap = {r: (dice(r) - dice("sup3")) / max(1e-8, dice("supFull") - dice("sup3"))
           for r in ("unimatch3", "sss_noSAM3")}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, device {a.device}"
    lines = [f"ACDC, 20 validation volumes, configuration `{CONFIG}`, {iterations} iterations per model "
             f"(budget {a.budget}), final checkpoints, no TTA; machine: {machine}.", "",
             "| model | labeled | RV Dice | MYO Dice | LV Dice | mean Dice | mean HD95 (mm) | gap closure |",
             "|---|---|---|---|---|---|---|---|"]
    for label, ds_id, trainer in RUNS:
        s = summaries[label]
        gc = f"{gap[label]:.2f}" if label in gap else "—"
        lines.append(f"| {label} ({trainer}) | {'70' if ds_id == FULL_ID else '3'} patients | "
                     + " | ".join(f"{dice(label, c):.3f}" for c in CLASSES)
                     + f" | {dice(label):.3f} | {s['foreground_mean']['hd95']:.2f} | {gc} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = {"iterations": iterations, "budget": a.budget, "configuration": CONFIG, "machine": machine,
           "runs": {label: {"dataset": ds_id, "trainer": trainer, "summary": summaries[label]}
                    for label, ds_id, trainer in RUNS},
           "gap_closure": gap, "train_seconds_this_invocation": train_seconds,
           "wall_seconds_this_invocation": time.time() - t0}
    for name, text in (("results.md", table + "\n"), ("results.json", json.dumps(out, indent=1))):
        tmp = work / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, work / name)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.2
    for i, (label, _, _) in enumerate(RUNS):
        vals = [dice(label, c) for c in CLASSES] + [dice(label)]
        ax.bar([j + i * width for j in range(4)], vals, width, label=label)
    ax.set_xticks([j + 1.5 * width for j in range(4)], [*CLASSES.values(), "mean"])
    ax.set_ylabel("Dice (20 ACDC validation volumes)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(work / "results.png.tmp.png")
    os.replace(work / "results.png.tmp.png", work / "results.png")
    print(f"\nwrote {work / 'results.md'}, results.json, results.png; gap closure: "
          + ", ".join(f"{k} {v:.2f}" for k, v in gap.items()))


if __name__ == "__main__":
    main()
