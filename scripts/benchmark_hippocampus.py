"""MSD Hippocampus, 3 labeled cases: semi-supervised vs supervised nnU-Net and nnU-Net self-training, 3 seeds.

One command, resumable (finished steps are skipped, an interrupted training run resumes with ``--c``):

    python scripts/benchmark_hippocampus.py --data ../shared/data/Hippocampus --work benchmark_output/hippocampus

Split (fixed, from the sorted case names and ``--split-seed``): 40 test cases never used in training, 20 validation
cases (learning curves, ablations and pseudo-label quality are read on them, never on test), 3 labeled cases, the
other 137 unlabeled. The reference ("full") has every non-test case labeled (160). The raw datasets under
``--work`` hold symlinks to ``--data``; nothing is copied.

Models, each trained with seeds 0, 1, 2 on fold ``all`` at the same iteration budget, same plans (configuration
``2d_cpu``: 4 stages, 16-128 features, batch 16, patch 56x40, planned on the 3-case dataset and moved to the others):

* ``sup3``      nnUNetTrainer_budget (stock nnUNetTrainer + seed/budget), 3 labeled cases
* ``full``      nnUNetTrainer_budget, 160 labeled cases
* ``selftrain`` nnU-Net self-training (nnU-Net#2338): ``sup3`` of the same seed predicts the unlabeled cases
                (``nnUNetv2_predict``), a new dataset holds labeled + pseudo-labeled cases, nnUNetTrainer_budget
                trains on it for the same number of iterations (its time on the plot includes the teacher's)
* ``unimatch``  nnUNetTrainerUniMatch (137 unlabeled cases)
* ``sss_noSAM`` nnUNetTrainerSSS_noSAM (UniMatch + DFE)

Plus: learning curves of sup3, unimatch and sss_noSAM (snapshots every fifth of the budget, scored on the validation
cases); sup3 at 2x (every seed) and 4x the budget (first seed) and full at 4x (first seed): does supervised plateau?
Ablation rows (one seed, validation cases) and the pseudo-label quality of the semi-supervised runs over training on
the validation cases (their labels hidden from training): per class, the fraction of ground-truth pixels that are
confident and the Dice of the confident pixels, at thresholds 0.8 / 0.9 / 0.95. Test numbers: final checkpoints,
nnU-Net's ``nnUNetPredictor`` without TTA (as ``nnUNetv2_predict --disable_tta``, run in this process), per-class
Dice and HD95 (mm), mean +- std over seeds. Writes ``results.md``, ``results.json`` and ``results.png`` (Dice
against training time, learning curves, pseudo-label quality) to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_lib as bl  # noqa: E402

SEMI_ID, FULL_ID, SELF_ID0 = 40, 41, 42
CONFIG = "2d_cpu"
CLASSES = {"1": "anterior", "2": "posterior"}
THRESHOLDS = (0.8, 0.9, 0.95)
CURVE_ARMS = ("sup3", "unimatch", "sss_noSAM")  # learning curves on the validation cases (first seed)
N_TEST, N_VAL, N_LABELED = 40, 20, 3
MAIN_ARMS = [  # label, trainer, dataset
    ("sup3", "nnUNetTrainer_budget", SEMI_ID),
    ("full", "nnUNetTrainer_budget", FULL_ID),
    ("selftrain", "nnUNetTrainer_budget", None),  # dataset = SELF_ID0 + seed
    ("unimatch", "nnUNetTrainerUniMatch", SEMI_ID),
    ("sss_noSAM", "nnUNetTrainerSSS_noSAM", SEMI_ID),
]
ABLATIONS = [  # label, trainer, what it changes, iteration factor (seed 0 only, validation cases), in run order
    ("sss_noSAM_adaptive", "nnUNetTrainerSSS_noSAM_adaptive",
     "class-adaptive confidence thresholds (0.95 x class confidence / max)", 1),
    ("unimatch_adaptive", "nnUNetTrainerUniMatch_adaptive",
     "class-adaptive confidence thresholds (0.95 x class confidence / max)", 1),
    ("unimatch_ratio025", "nnUNetTrainerUniMatch_ratio025",
     "unlabeled batch 1/4 of the labeled, 4x the iterations (as sup3 x4; about 1.6x its training time)", 4),
    ("sss_noSAM_ratio025", "nnUNetTrainerSSS_noSAM_ratio025",
     "unlabeled batch 1/4 of the labeled, 4x the iterations (as sup3 x4)", 4),
    ("sss_noSAM_dfe2", "nnUNetTrainerSSS_noSAM_dfe2", "DFE on the two deepest scales only (all by default)", 1),
    ("unimatch_cutmix1", "nnUNetTrainerUniMatch_cutmix1", "CutMix probability 1.0 (0.5 default)", 1),
    ("unimatch_rampup", "nnUNetTrainerUniMatch_rampup", "sigmoid ramp-up of the unsupervised weights (20%)", 1),
    ("unimatch_thr090", "nnUNetTrainerUniMatch_thr090", "confidence threshold 0.90 (0.95 default)", 1),
    ("unimatch_mixdraw", "nnUNetTrainerUniMatch_mixdraw", "CutMix partners from a separate loader draw", 1),
]


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


def raw_folder(base: dict, ds_id: int) -> Path:
    return next(Path(base["nnUNet_raw"]).glob(f"Dataset{ds_id:03d}_*"))


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.work = args.work.resolve()
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.base = bl.base_env(self.work, args.np)
        if args.jobs > 1:  # one core per training job (and per in-process prediction)
            self.base.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            import torch

            torch.set_num_threads(1)
        # planning needs nnUNet_n_proc_DA >= 1 (it sets torch's thread count from it); training may use 0
        self.train_base = {**self.base, "nnUNet_n_proc_DA": str(args.da_workers)}
        self.it = args.iterations
        self.locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)  # one per run: no double start

    def run_of(self, label: str, trainer: str, ds_id: int | None, seed: int, factor: float = 1) -> bl.Run:
        iterations = max(1, round(self.it * factor / bl.Run.iters_per_epoch)) * bl.Run.iters_per_epoch
        return bl.Run(label, ds_id if ds_id is not None else SELF_ID0 + seed, trainer, seed, iterations, CONFIG)

    def train(self, r: bl.Run) -> None:
        if r.label == "selftrain" and not (r.fold_dir(self.work) / "checkpoint_final.pth").exists():
            teacher = self.run_of("sup3", "nnUNetTrainer_budget", SEMI_ID, r.seed)
            with self.locks[f"{teacher.name}_{teacher.iterations}"]:
                bl.train(teacher, self.train_base, self.work, self.a.device, snapshot_every=self.snap_every(teacher))
            bl.build_self_training_dataset(teacher, self.base, self.work, raw_folder(self.base, SEMI_ID), r.dataset,
                                           f"HippoSelfTrain_s{r.seed}", self.a.device)
            bl.prepare_copied_plans(SEMI_ID, r.dataset, CONFIG, self.base, self.work, self.a.np,
                                    f".planned_{r.dataset}")
        with self.locks[f"{r.name}_{r.iterations}"]:
            bl.train(r, self.train_base, self.work, self.a.device, snapshot_every=self.snap_every(r))
        self.score_run(r)

    def score_run(self, r: bl.Run) -> None:
        """Predict and score what the report will need of this run as soon as it is trained (cached)."""
        ablation = r.label in {a[0] for a in ABLATIONS}
        self.score(r, "test")
        if r.seed == self.a.seeds[0] and r.iterations == self.it and r.label in CURVE_ARMS:
            for _, ck in bl.snapshots(r, self.work):
                self.score(r, "val", ck)
        elif ablation or (r.seed == self.a.seeds[0] and r.iterations == self.it):
            self.score(r, "val")

    def snap_every(self, r: bl.Run) -> int:
        return max(1, r.iterations // r.iters_per_epoch // 5)

    def all_runs(self) -> list[bl.Run]:
        """In priority order (an interrupted benchmark has the most important runs): every seed of the main arms;
        then is supervised at a plateau? (sup3 and full at 4x, first seed); the cheap unlabeled batch at 4x;
        sup3 at 2x for every seed; the other ablations."""
        first = self.a.seeds[0]
        runs = [self.run_of(lab, tr, ds, s) for s in self.a.seeds for lab, tr, ds in MAIN_ARMS]
        runs += [self.run_of("full", "nnUNetTrainer_budget", FULL_ID, first, 4),
                 self.run_of("sup3", "nnUNetTrainer_budget", SEMI_ID, first, 4)]
        ablations = [self.run_of(lab, tr, SEMI_ID, first, f) for lab, tr, _, f in ABLATIONS]
        if not self.a.no_ablations:
            runs.append(ablations.pop(0))
        runs += [self.run_of("sup3", "nnUNetTrainer_budget", SEMI_ID, s, 2) for s in self.a.seeds]
        if not self.a.no_ablations:
            runs += ablations
        return runs

    def train_all(self, runs: list[bl.Run]) -> None:
        # teachers before their self-training students; semi-supervised runs interleave with the cheap ones
        with ThreadPoolExecutor(max_workers=self.a.jobs) as pool:
            for f in [pool.submit(self.train, r) for r in runs]:
                f.result()

    def score(self, r: bl.Run, split: str, checkpoint: str = "checkpoint_final.pth") -> dict:
        """Dice/HD95 of one checkpoint on the test or validation cases (predicted in this process, see
        ``predict_in_process``); on validation cases also the pseudo-label quality of that checkpoint."""
        raw = raw_folder(self.base, SEMI_ID)
        images, labels = {"test": ("imagesTs", "labelsTs"), "val": ("imagesVal", "labelsVal")}[split]
        tag = f"{split}_{r.name}_it{r.iterations}_{Path(checkpoint).stem}"
        pred = predict_in_process(self, r, checkpoint, raw / images, raw / labels, self.work / "predictions" / tag,
                                  quality=split == "val")
        return bl.evaluate(raw / labels, pred, raw / "dataset.json", self.work / "evaluation" / tag)

    def seconds(self, r: bl.Run, checkpoint: str = "checkpoint_final.pth") -> float:
        t = bl.training_seconds(r.fold_dir(self.work) / checkpoint)
        if r.label == "selftrain":
            t += bl.training_seconds(self.run_of("sup3", "nnUNetTrainer_budget", SEMI_ID, r.seed)
                                     .fold_dir(self.work) / "checkpoint_final.pth")
        return t


def predict_in_process(b: Bench, r: bl.Run, checkpoint: str, images: Path, labels: Path, out: Path,
                       quality: bool) -> Path:
    """nnU-Net's own ``nnUNetPredictor`` (what ``nnUNetv2_predict --disable_tta`` runs: same preprocessing, sliding
    window, resampling back), in this process: a subprocess per checkpoint costs more than predicting the cases.

    With ``quality``, also the pseudo-label quality over these cases (their labels never reach training): per class
    and threshold, the fraction of the class's ground-truth pixels whose prediction is confident, and the Dice of the
    prediction against the ground truth restricted to confident pixels; from un-augmented images, a proxy for the
    weak view. Written to ``out/pseudo_quality.json``."""
    if (out / ".done").exists():
        return out
    import shutil

    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    print(f"[....] predict {r.name} it{r.iterations} {checkpoint} -> {out.name}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device(b.a.device),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(r.fold_dir(b.work).parent), ("all",), checkpoint)
    io = SimpleITKIO()
    acc = {c: {t: np.zeros(3) for t in THRESHOLDS} for c in CLASSES}  # tp, |pred|+|gt|, confident gt pixels
    gt_total = dict.fromkeys(CLASSES, 0)
    for lab in sorted(labels.glob("*.nii.gz")):
        img, props = io.read_images([str(images / f"{lab.name[:-7]}_0000.nii.gz")])
        seg, probs = predictor.predict_single_npy_array(img, props, None, None, True)
        io.write_seg(np.asarray(seg).astype(np.uint8), str(tmp / lab.name), props)
        if not quality:
            continue
        gt = io.read_seg(str(lab))[0][0]
        probs = np.asarray(probs)
        if probs.shape[1:] != gt.shape:
            raise RuntimeError(f"{lab}: probabilities {probs.shape[1:]} vs label {gt.shape}")
        conf = probs.max(0)
        for c in CLASSES:
            ci = int(c)
            gt_total[c] += int((gt == ci).sum())
            for t in THRESHOLDS:
                m = conf >= t
                p, g = (seg == ci) & m, (gt == ci) & m
                acc[c][t] += [(p & g).sum(), p.sum() + g.sum(), g.sum()]
    if quality:
        res = {CLASSES[c]: {str(t): {"confident_dice": float(2 * a[0] / a[1]) if a[1] else None,
                                     "confident_fraction": float(a[2] / gt_total[c]) if gt_total[c] else None}
                            for t, a in acc[c].items()} for c in CLASSES}
        (tmp / "pseudo_quality.json").write_text(json.dumps(res, indent=1))
    (tmp / ".done").touch()
    os.replace(tmp, out)
    return out


def pseudo_label_quality(b: Bench, r: bl.Run, checkpoint: str) -> dict:
    b.score(r, "val", checkpoint)
    tag = f"val_{r.name}_it{r.iterations}_{Path(checkpoint).stem}"
    return json.loads((b.work / "predictions" / tag / "pseudo_quality.json").read_text())


def fg_dice(s: dict, cls: str | None = None) -> float:
    return s["foreground_mean"]["dice"] if cls is None else s["per_class"][cls]["dice"]["mean"]


def fg_hd95(s: dict, cls: str | None = None) -> float:
    return s["foreground_mean"]["hd95"] if cls is None else s["per_class"][cls]["hd95"]["mean"]


def report(b: Bench, split: dict) -> None:
    seeds, work = b.a.seeds, b.work
    main_rows, results = [], {"iterations": b.it, "configuration": CONFIG, "seeds": seeds, "split": split,
                              "machine": bl.machine_line(b.a.device), "arms": {}, "ablations": {},
                              "learning_curves": {}, "pseudo_label_quality": {}}
    # test table: final checkpoints of the main arms and the 2x-budget runs
    rows = [(lab, tr, ds, 1) for lab, tr, ds in MAIN_ARMS]
    rows += [("sup3", "nnUNetTrainer_budget", SEMI_ID, 2), ("sup3", "nnUNetTrainer_budget", SEMI_ID, 4),
             ("full", "nnUNetTrainer_budget", FULL_ID, 4)]
    rows += [(lab, tr, SEMI_ID, f) for lab, tr, _, f in ABLATIONS if f != 1]  # long ablation runs: test too
    for lab, tr, ds, factor in rows:
        runs = [b.run_of(lab, tr, ds, s, factor) for s in seeds]
        runs = [r for r in runs if (r.fold_dir(work) / "checkpoint_final.pth").exists()]
        if not runs:
            continue
        summaries = [b.score(r, "test") for r in runs]
        key = lab if factor == 1 else f"{lab}_x{factor}"
        results["arms"][key] = {
            "trainer": tr, "iterations": b.it * factor, "seeds": [r.seed for r in runs],
            "dice": {CLASSES[c]: [fg_dice(s, c) for s in summaries] for c in CLASSES} | {
                "mean": [fg_dice(s) for s in summaries]},
            "hd95": {CLASSES[c]: [fg_hd95(s, c) for s in summaries] for c in CLASSES} | {
                "mean": [fg_hd95(s) for s in summaries]},
            "train_seconds": [b.seconds(r) for r in runs]}
    arms = results["arms"]

    def mean(key: str) -> float | None:
        return float(np.mean(arms[key]["dice"]["mean"])) if key in arms else None

    sup, full = mean("sup3"), mean("full")
    for key, v in arms.items():
        same_budget = v["iterations"] == b.it  # against sup3 and full at the same budget only
        gc = (float(np.mean(v["dice"]["mean"])) - sup) / (full - sup) \
            if same_budget and sup is not None and full and full != sup else None
        v["gap_closure"] = gc
        main_rows.append(
            f"| {key} | {v['trainer']} | {v['iterations']} | {len(v['seeds'])} | "
            + " | ".join(bl.fmt(v["dice"][n]) for n in CLASSES.values()) + f" | {bl.fmt(v['dice']['mean'])} | "
            + f"{bl.fmt(v['hd95']['mean'], 2)} | {'—' if gc is None else f'{gc:.2f}'} | "
            + f"{bl.fmt([t / 60 for t in v['train_seconds']], 1)} |")
    # learning curves on the validation cases (seed 0 only, to keep prediction time bounded)
    for lab, tr, ds, factor in rows:
        r = b.run_of(lab, tr, ds, seeds[0], factor)
        if factor != 1 or lab not in CURVE_ARMS or not (r.fold_dir(work) / "checkpoint_final.pth").exists():
            continue
        curve = []
        for it, ck in bl.snapshots(r, work):
            s = b.score(r, "val", ck)
            curve.append({"iterations": it, "seconds": b.seconds(r, ck), "dice": fg_dice(s)})
        results["learning_curves"][lab if factor == 1 else f"{lab}_x{factor}"] = curve
        if tr != "nnUNetTrainer_budget" and factor == 1:
            results["pseudo_label_quality"][lab] = [
                {"iterations": it, **pseudo_label_quality(b, r, ck)} for it, ck in bl.snapshots(r, work)]
    # ablations: seed 0, validation cases, against their base trainer
    abl_rows = []
    for lab, tr, what, f in [("unimatch", "nnUNetTrainerUniMatch", "default", 1),
                             ("sss_noSAM", "nnUNetTrainerSSS_noSAM", "default", 1), *ABLATIONS]:
        r = b.run_of(lab, tr, SEMI_ID, seeds[0], f)
        if not (r.fold_dir(work) / "checkpoint_final.pth").exists():
            continue
        s = b.score(r, "val")
        results["ablations"][lab] = {"trainer": tr, "what": what, "iterations": r.iterations, "val_dice": fg_dice(s),
                                     "val_dice_per_class": {n: fg_dice(s, c) for c, n in CLASSES.items()},
                                     "train_seconds": b.seconds(r)}
        abl_rows.append(f"| {lab} | {what} | {r.iterations} | " + " | ".join(f"{fg_dice(s, c):.3f}" for c in CLASSES)
                        + f" | {fg_dice(s):.3f} | {b.seconds(r) / 60:.1f} |")
    lines = [f"MSD Hippocampus, {N_LABELED} labeled / {len(split['unlabeled'])} unlabeled cases, "
             f"{N_TEST} test cases never used in training; configuration `{CONFIG}`; final checkpoints, no TTA; "
             f"mean ± std over seeds; machine: {results['machine']}.", "",
             "| model | trainer | iterations | seeds | anterior Dice | posterior Dice | mean Dice | mean HD95 (mm) "
             "| gap closure | training min |", "|---|---|---|---|---|---|---|---|---|---|", *main_rows, "",
             f"Ablations (seed {seeds[0]} only, {N_VAL} validation cases, final checkpoints):", "",
             "| run | change | iterations | anterior Dice | posterior Dice | mean Dice | training min |",
             "|---|---|---|---|---|---|---|",
             *abl_rows, ""]
    if results["pseudo_label_quality"]:
        lines += [f"Pseudo-label quality on the {N_VAL} validation cases (labels hidden from training), seed "
                  f"{seeds[0]}: confident fraction of each class's pixels / Dice of the confident pixels", "",
                  "| run | iterations | " + " | ".join(f"{n} @{t}" for n in CLASSES.values() for t in THRESHOLDS)
                  + " |", "|---|---|" + "---|" * (len(CLASSES) * len(THRESHOLDS))]
        for lab, pts in results["pseudo_label_quality"].items():
            for p in pts:
                cells = [f"{p[n][str(t)]['confident_fraction']:.2f} / {p[n][str(t)]['confident_dice'] or 0:.3f}"
                         for n in CLASSES.values() for t in THRESHOLDS]
                lines.append(f"| {lab} | {p['iterations']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    bl.write_atomic(work / "results.md", table)
    bl.write_atomic(work / "results.json", json.dumps(results, indent=1))
    plot(results, work / "results.png")
    print("\n" + table, flush=True)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for key, v in results["arms"].items():
        ax.scatter(np.asarray(v["train_seconds"]) / 60, v["dice"]["mean"], label=key,
                   marker="o" if "x2" not in key else "^")
    ax.set_xlabel("training time (min, teacher included for selftrain)")
    ax.set_ylabel("test mean Dice (final checkpoint)")
    ax.set_title("Dice against training time (each point one seed)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, curve in results["learning_curves"].items():
        ax.plot([p["seconds"] / 60 for p in curve], [p["dice"] for p in curve], marker=".", label=key)
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("validation mean Dice (snapshots)")
    ax.set_title("learning curves (seed 0, validation cases)")
    ax.legend(fontsize=7)
    ax = axes[2]
    for lab, pts in results["pseudo_label_quality"].items():
        for t, ls in zip(THRESHOLDS, (":", "--", "-")):
            frac = [np.mean([p[n][str(t)]["confident_fraction"] for n in CLASSES.values()]) for p in pts]
            ax.plot([p["iterations"] for p in pts], frac, ls, label=f"{lab} confident fraction @{t}")
        dice = [np.mean([p[n]["0.95"]["confident_dice"] or 0 for n in CLASSES.values()]) for p in pts]
        ax.plot([p["iterations"] for p in pts], dice, "-o", ms=3, label=f"{lab} Dice of confident @0.95")
    ax.set_xlabel("iterations")
    ax.set_title("pseudo-labels on validation cases (foreground mean)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=bl.ROOT.parent / "shared" / "data" / "Hippocampus")
    p.add_argument("--work", type=Path, default=bl.ROOT / "benchmark_output" / "hippocampus")
    p.add_argument("--iterations", type=int, default=600, help="training iterations per model (sup3 also x2, x4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--split-seed", type=int, default=2026)
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (each gets one thread when > 1)")
    p.add_argument("--da-workers", type=int, default=0, help="nnUNet_n_proc_DA for training (0: in-process)")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--only", nargs="*", default=None, help="train only these labels (e.g. sup3 sss_noSAM)")
    p.add_argument("--report-only", action="store_true", help="score and report what has finished, train nothing")
    p.add_argument("--device", default="cpu")
    p.add_argument("-np", type=int, default=2, help="worker processes for preprocessing")
    a = p.parse_args()
    if not a.data.is_dir():
        raise SystemExit(f"{a.data}: MSD Hippocampus not found (imagesTr/ and labelsTr/ with 200 .nii.gz pairs)")
    b = Bench(a)
    t0 = time.time()
    split = split_cases(a.data, a.split_seed)
    bl.write_atomic(b.work / "split.json", json.dumps(split, indent=1))
    build_raw(a.data, split, b.work)
    plan(b.base, b.work, a.np, a.batch_size)
    if not a.report_only:
        runs = [r for r in b.all_runs() if a.only is None or r.label in a.only]
        b.train_all(runs)
    report(b, split)
    print(f"wall time of this invocation: {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
