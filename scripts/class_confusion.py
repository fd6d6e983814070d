"""Where does each class's error go? Voxel confusion of predictions against ground truth, pooled over the cases.

Dice says how much of a structure is wrong, not whether it is lost to background (under-segmentation), spilled into
background (over-segmentation) or confused with a neighbouring structure. For each class this prints its recall,
the share of its ground-truth voxels predicted as background or as another class, and the share of its predicted
voxels that are background or another class in the ground truth:

    python scripts/class_confusion.py --labels WORK/nnUNet_raw/Dataset040_Hippo3/labelsVal \\
        --predictions WORK/predictions/val_sup_s0_it4000_checkpoint_final WORK/predictions/val_sss_ws_...

Every prediction folder must hold one file per ground-truth file, same name and shape; labels are integers 0..C-1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from nnunetv2_sss.evaluation.metrics import check_pair, detect_file_ending, pair_cases, read_segmentation
from nnunetv2_sss.files import atomic_write_json


def confusion(labels: Path, predictions: Path, num_classes: int) -> np.ndarray:
    """Rows: ground-truth class, columns: predicted class; voxel counts summed over every case of ``labels``, paired,
    checked and read as ``nnUNetv2_sss_evaluate`` does."""
    ending = detect_file_ending(labels)
    pairs, _ = pair_cases(sorted(labels.glob(f"*{ending}")), predictions, ending, allow_missing=False)
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    for case, g_file, p_file in pairs:
        check_pair(g_file, p_file)
        g, q = (read_segmentation(f)[0].astype(np.int64).ravel() for f in (g_file, p_file))
        if g.max(initial=0) >= num_classes or q.max(initial=0) >= num_classes:
            raise SystemExit(f"{case}: a label >= {num_classes}; pass --num-classes")
        m += np.bincount(num_classes * g + q, minlength=num_classes**2).reshape(num_classes, num_classes)
    return m


def shares(m: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for c in range(1, m.shape[0]):
        gt, pred = m[c].sum(), m[:, c].sum()
        other = [k for k in range(1, m.shape[0]) if k != c]
        out[str(c)] = {
            "recall": m[c, c] / max(gt, 1),
            "missed_as_background": m[c, 0] / max(gt, 1),
            "missed_as_other_class": m[c, other].sum() / max(gt, 1),
            "predicted_on_background": m[0, c] / max(pred, 1),
            "predicted_on_other_class": m[other, c].sum() / max(pred, 1),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=Path, required=True, help="folder of ground-truth segmentations")
    p.add_argument("--predictions", type=Path, nargs="+", required=True, help="prediction folders (same file names)")
    p.add_argument("--num-classes", type=int, default=None, help="classes including background (default: "
                   "from dataset.json beside the labels folder)")
    p.add_argument("--json", type=Path, help="also write the shares here")
    a = p.parse_args()
    n = a.num_classes
    if n is None:
        ds = a.labels.parent / "dataset.json"
        if not ds.is_file():
            raise SystemExit(f"{ds} not found: pass --num-classes")
        n = len(json.loads(ds.read_text())["labels"])
    res = {}
    print("| predictions | class | recall | missed as background | missed as other class | predicted on background "
          "| predicted on other class |\n|---|---|---|---|---|---|---|")
    for pred in a.predictions:
        res[pred.name] = shares(confusion(a.labels, pred, n))
        for c, sh in res[pred.name].items():
            print(f"| {pred.name} | {c} | " + " | ".join(f"{v:.3f}" for v in sh.values()) + " |")
    if a.json:
        atomic_write_json(a.json, res, indent=1)


if __name__ == "__main__":
    main()
