"""Seconds per training iteration and peak memory of several trainers on the same plans and batch size.

Each trainer runs in its own process (clean peak memory): nnU-Net's own start-up (network, loaders), a few
warm-up iterations, then the median wall time of ``train_step(next(dataloader_train))`` over N iterations, data
loading included, as in ``run_training``. Peak memory is the process's max RSS on the CPU, and
``torch.cuda.max_memory_allocated`` on CUDA.

    python scripts/benchmark_iteration.py -d 990 -c 2d -tr nnUNetTrainer nnUNetTrainerSSS_noSAM -n 20

``-tr nnUNetTrainerSSS_SAMTermTiming`` times the per-step part of ``nnUNetTrainerSSS``'s SAM-2 term (the SAM maps
loaded and warped with each unlabeled patch, the SAM loss on both strong views) with a timing double defined here:
all-ignore maps stand in for SAM-2 output, so no checkpoint is needed and the step does the same arithmetic. The
periodic refresh (student prediction, PCSW, SAM-2 decode from the cache) is timed by ``scripts/benchmark_sam2.py``;
amortised over ``sam_refresh_every`` epochs it adds (refresh seconds) / (sam_refresh_every * iterations per epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAM_TERM_TIMING = "nnUNetTrainerSSS_SAMTermTiming"


def sam_term_timing_trainer(dataset: str, configuration: str, device):
    """Timing double for nnUNetTrainerSSS's per-step SAM work (see the module docstring); never a result."""
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunetv2_sss.sam.refresh import init_empty_pseudolabels
    from nnunetv2_sss.training.semi_supervised import nnUNetTrainerSSS_noSAM

    class nnUNetTrainerSSS_SAMTermTiming(nnUNetTrainerSSS_noSAM):
        use_sam = True
        lambda_sam = 0.5

        def prepare_unlabeled_data(self) -> None:
            super().prepare_unlabeled_data()
            init_empty_pseudolabels(self.unlabeled_folder, maps_folder=self.sam_maps_folder)

        def sam_loss_weight(self) -> float:
            return self.lambda_sam

    folder = join(nnUNet_preprocessed, maybe_convert_to_dataset_name(dataset))
    plans = {**load_json(join(folder, "nnUNetPlans.json")), "continue_training": False}  # as get_trainer_from_args
    return nnUNetTrainerSSS_SAMTermTiming(plans, configuration, "all", load_json(join(folder, "dataset.json")), device)


def run_one(dataset: str, configuration: str, trainer: str, n: int, warmup: int, device: str) -> dict:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_sss.cli import ensure_ext_trainer_env

    # the package's trainers and the benchmark-only ablation trainers (scripts/bench_trainers)
    os.environ["nnUNet_extTrainer"] = os.pathsep.join([ensure_ext_trainer_env(),
                                                       str(Path(__file__).resolve().parent / "bench_trainers")])
    if trainer == SAM_TERM_TIMING:
        t = sam_term_timing_trainer(dataset, configuration, torch.device(device))
    else:
        t = get_trainer_from_args(dataset, configuration, "all", trainer, "nnUNetPlans", device=torch.device(device))
    t.disable_checkpointing = True
    if hasattr(t, "unsup_warmup_fraction"):
        t.unsup_warmup_fraction = 0.0  # time the semi-supervised step, not the supervised warm-up
    t.on_train_start()
    t.on_train_epoch_start()
    times = []
    for i in range(warmup + n):
        start = time.perf_counter()
        t.train_step(next(t.dataloader_train))
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"trainer": trainer, "s_per_it_median": statistics.median(times), "s_per_it_mean": statistics.mean(times),
              "peak_memory_mib": peak, "memory_kind": "cuda max allocated" if device == "cuda" else "max RSS",
              "batch_size": t.batch_size, "unlabeled_batch_size": getattr(t, "unlabeled_batch_size", 0),
              "patch_size": list(t.configuration_manager.patch_size), "iterations": n}
    t.on_train_end()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset (must be planned and preprocessed)")
    p.add_argument("-c", default="2d")
    p.add_argument("-tr", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerUniMatch", "nnUNetTrainerSSS_noSAM"])
    p.add_argument("-n", type=int, default=20, help="timed iterations per trainer")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--single", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.single:
        print("RESULT " + json.dumps(run_one(a.d, a.c, a.single, a.n, a.warmup, a.device)))
        return
    from nnunetv2_sss.cli import cpu_friendly_env

    env = cpu_friendly_env(dict(os.environ))
    results = []
    for tr in a.tr:
        cmd = [sys.executable, __file__, "-d", a.d, "-c", a.c, "-n", str(a.n), "--warmup", str(a.warmup),
               "--device", a.device, "--single", tr]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(f"{tr} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        results.append(json.loads(line[0][7:]))
        print(f"{tr}: {results[-1]['s_per_it_median']:.3f} s/it", flush=True)
    base = results[0]["s_per_it_median"]
    import torch

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    print(f"\nDataset {a.d}, configuration {a.c}, device {a.device} ({machine}), {a.n} timed iterations\n")
    print("| trainer | labeled batch | unlabeled batch | s/it (median) | ratio vs first | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        r["ratio_vs_first"] = r["s_per_it_median"] / base
        print(f"| {r['trainer']} | {r['batch_size']} | {r['unlabeled_batch_size']} | {r['s_per_it_median']:.3f} | "
              f"{r['ratio_vs_first']:.2f} | {r['peak_memory_mib']:.0f} ({r['memory_kind']}) |")
    if a.out:
        from nnunetv2_sss.files import atomic_write_json

        atomic_write_json(a.out, {"machine": machine, "dataset": a.d, "configuration": a.c, "results": results},
                          indent=1)


if __name__ == "__main__":
    main()
