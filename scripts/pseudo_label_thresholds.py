"""What a background threshold of its own would change in the pseudo-labels, measured on labeled validation cases.

For each checkpoint (e.g. the supervised model a warm start begins from, and a semi-supervised model), every case
of ``--labels`` is predicted from ``--images`` by nnU-Net's ``nnUNetPredictor`` (no TTA), and for each background
threshold t (the foreground classes' threshold does not change these numbers):

* per class c, ``confident_background``: the share of c's labelled pixels predicted background with confidence
  >= t, the pseudo-label error that teaches a student to shrink the structure;
* ``background_kept``: the share of truly-background pixels still confidently background (what the unsupervised
  loss keeps of background); ``background_precision``: of the confident background pixels, the share truly
  background.

Labels never reach training: this chooses the trainers' ``background_threshold`` on validation cases. Output: a
table on stdout and ``--out`` (JSON).

    python scripts/pseudo_label_thresholds.py --images VAL_IMAGES --labels VAL_LABELS --dataset-json DATASET.json \\
        --checkpoints RESULTS/.../fold_all/checkpoint_final.pth ... --out thresholds.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bench_lib as bl
import numpy as np


def sweep(checkpoint: Path, images: Path, labels: Path, ds: dict, thresholds: list[float], device: str) -> dict:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_sss.evaluation.prediction import predictor_from_checkpoint

    ending, n_ch = ds["file_ending"], len(ds["channel_names"])
    classes = {int(v): k for k, v in ds["labels"].items() if int(v) > 0}
    predictor = predictor_from_checkpoint(checkpoint, device)
    io = SimpleITKIO()
    # per t: [per class: structure pixels, of those confidently background], true-bg pixels, kept, confident bg
    per_class = {t: {c: np.zeros(2) for c in classes} for t in thresholds}
    bg = {t: np.zeros(3) for t in thresholds}
    cases = sorted(labels.glob(f"*{ending}"))
    if not cases:
        raise SystemExit(f"{labels}: no label files ending in {ending}")
    for lab in cases:
        case = lab.name[: -len(ending)]
        img, props = io.read_images([str(images / f"{case}_{i:04d}{ending}") for i in range(n_ch)])
        seg, probs = predictor.predict_single_npy_array(img, props, None, None, True)
        gt = io.read_seg(str(lab))[0][0]
        conf = np.asarray(probs).max(0)
        if conf.shape != gt.shape:
            raise RuntimeError(f"{lab}: probabilities {conf.shape} vs label {gt.shape}")
        for t in thresholds:
            conf_bg = (seg == 0) & (conf >= t)
            for c in classes:
                g = gt == c
                per_class[t][c] += [g.sum(), (g & conf_bg).sum()]
            true_bg = gt == 0
            bg[t] += [true_bg.sum(), (true_bg & conf_bg).sum(), conf_bg.sum()]
    return {"checkpoint": str(checkpoint), "cases": len(cases),
            "background_thresholds": {
                str(t): {"confident_background": {classes[c]: float(v[1] / v[0]) if v[0] else None
                                                  for c, v in per_class[t].items()},
                         "background_kept": float(bg[t][1] / bg[t][0]),
                         "background_precision": float(bg[t][1] / bg[t][2]) if bg[t][2] else None}
                for t in thresholds}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="validation images (nnU-Net naming, _0000 ...)")
    p.add_argument("--labels", type=Path, required=True, help="their labels (never used in training)")
    p.add_argument("--dataset-json", type=Path, required=True, help="the dataset's dataset.json")
    p.add_argument("--checkpoints", type=Path, nargs="+", required=True)
    p.add_argument("--background-thresholds", type=float, nargs="+", default=[0.95, 0.98, 0.99, 0.995, 0.999])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    for f in (a.images, a.labels):
        if not f.is_dir():
            raise SystemExit(f"{f}: not a folder")
    for ck in a.checkpoints:
        if not ck.is_file():
            raise SystemExit(f"{ck}: checkpoint not found")
    from nnunetv2_sss.cli import ensure_ext_trainer_env

    bl.with_bench_trainers(ensure_ext_trainer_env())  # benchmark trainers are found by name
    ds = json.loads(a.dataset_json.read_text())
    res = [sweep(ck, a.images, a.labels, ds, a.background_thresholds, a.device) for ck in a.checkpoints]
    bl.write_atomic(a.out, json.dumps({"machine": bl.machine_line(a.device), "commit": bl.git_commit(),
                                       "results": res}, indent=1))
    for r in res:
        print(r["checkpoint"])
        for t, v in r["background_thresholds"].items():
            cb = ", ".join(f"{k} {x:.3f}" for k, x in v["confident_background"].items())
            print(f"  background t = {t}: structure confidently background: {cb}; background kept "
                  f"{v['background_kept']:.4f}, precision {v['background_precision']:.4f}")


if __name__ == "__main__":
    main()
