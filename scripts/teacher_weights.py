"""Would the EMA teacher's weights make a better final model than the student's? Measured, not assumed.

An ``_EMA`` trainer keeps its teacher under ``sss_state`` and ships the student as ``network_weights``. This writes a
copy of a finished checkpoint whose ``network_weights`` are the teacher's (a stock nnU-Net checkpoint, beside the
original), predicts the labeled cases with both (nnU-Net's predictor, no TTA) and prints both Dice scores:

    python scripts/teacher_weights.py \\
        --fold WORK/results/<run>/Dataset040_Hippo3/<trainer>__nnUNetPlans__2d_cpu/fold_all \\
        --images WORK/nnUNet_raw/Dataset040_Hippo3/imagesVal --labels WORK/nnUNet_raw/Dataset040_Hippo3/labelsVal \\
        --out WORK/teacher_weights/<run>

Use the validation cases: this is a choice of the final model, so the test cases stay out of it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_lib import evaluate, fg_dice, predict_in_process, with_bench_trainers

from nnunetv2_sss.cli import ensure_ext_trainer_env
from nnunetv2_sss.files import atomic_torch_save, atomic_write_json

TEACHER_CHECKPOINT = "checkpoint_final_teacher.pth"


def write_teacher_checkpoint(fold: Path) -> Path:
    """``checkpoint_final.pth`` with the EMA teacher as ``network_weights``; refused when the run has no teacher."""
    ck = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    teacher = (ck.get("sss_state") or {}).get("ema_teacher")
    if teacher is None:
        raise SystemExit(f"{fold / 'checkpoint_final.pth'} has no EMA teacher (sss_state.ema_teacher): train an "
                         "_EMA trainer (e.g. nnUNetTrainerSSS_noSAM_EMA) to compare teacher and student")
    if teacher.keys() != ck["network_weights"].keys():
        raise SystemExit(f"{fold}: the teacher's parameter names differ from the network's; not a checkpoint of this "
                         "package's _EMA trainers")
    ck["network_weights"] = teacher
    return atomic_torch_save(ck, fold / TEACHER_CHECKPOINT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fold", type=Path, required=True, help="fold folder of a finished _EMA run")
    ap.add_argument("--images", type=Path, required=True, help="images of the labeled cases to predict")
    ap.add_argument("--labels", type=Path, required=True, help="their labels")
    ap.add_argument("--out", type=Path, required=True, help="folder for predictions and evaluations")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    with_bench_trainers(ensure_ext_trainer_env())
    dataset_json = a.fold.parent / "dataset.json"  # nnU-Net copies it beside the folds
    write_teacher_checkpoint(a.fold)
    result = {}
    for name, checkpoint in (("student", "checkpoint_final.pth"), ("teacher", TEACHER_CHECKPOINT)):
        pred = predict_in_process(a.fold, checkpoint, a.images, a.labels, a.out / f"pred_{name}", dataset_json,
                                  a.device)
        s = evaluate(a.labels, pred, dataset_json, a.out / f"eval_{name}")
        result[name] = {"mean_dice": fg_dice(s), "per_class_dice": {c: fg_dice(s, c) for c in s["per_class"]}}
        print(f"{name}: mean Dice {result[name]['mean_dice']:.4f} {result[name]['per_class_dice']}")
    atomic_write_json(a.out / "teacher_weights.json", result, indent=1)


if __name__ == "__main__":
    main()
