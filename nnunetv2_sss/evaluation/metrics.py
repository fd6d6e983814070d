"""Per-case, per-class Dice, HD95 and ASD in physical units (spacing read from the image files).

Definitions (all distances in the physical units of the image spacing, i.e. mm for NIfTI):

* Surface of a mask: the mask voxels that have at least one face neighbour (rank-1 connectivity) outside the
  mask; space beyond the image border counts as background, so an object touching the border has its surface there.
* Directed surface distances A->B: for every surface voxel of A, the Euclidean distance (``sampling=spacing``) to
  the nearest surface voxel of B. Both directions are pooled into one set (the *union*).
* HD95: the 95th percentile (numpy linear interpolation) of the union of both directed surface-distance sets.
  This is not medpy's ``hd95`` (which takes the larger of the two directed 95th percentiles).
* ASD: the mean of the union of both directed surface-distance sets (each surface voxel weighs the same).
* Dice: 2|A and B| / (|A| + |B|).

Empty-mask rules (``EMPTY_RULES``; the ``empty`` column of the per-case CSV flags every case they applied to):

* GT and prediction both empty for a class: Dice = 1, HD95 = 0, ASD = 0, flag ``both_empty``. Such cases are kept
  in every mean/std/median (the prediction is right), and ``summary.json`` counts them per class.
* Exactly one of the two empty (flag ``pred_empty`` or ``gt_empty``): Dice = 0, HD95 = ASD = the physical
  diagonal of the image, sqrt(sum((shape_i * spacing_i)^2)), a finite worst-case penalty so that means stay
  defined. Singleton axes are dropped first (see below), so a 2D slice stored as 3D gets its 2D diagonal.

Axes of size 1 are dropped before any metric: a 2D slice stored as a 3D image (nnU-Net writes such slices with a
spacing of 999 along the fake axis) would otherwise make every voxel a surface voxel and inflate the diagonal.

Voxels carrying the dataset's ``ignore`` label in the GT are removed from the prediction before scoring, which
matches how nnU-Net's own evaluation leaves them out of Dice.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure
from tqdm import tqdm

from nnunetv2_sss.evaluation.report import plot_boxes, write_csv, write_json

LabelOrRegion = int | tuple[int, ...]

METRICS: tuple[str, ...] = ("dice", "hd95", "asd")

EMPTY_RULES: dict[str, str] = {
    "both_empty": "GT and prediction both empty for a class: Dice = 1, HD95 = 0, ASD = 0 (flag 'both_empty'); "
                  "kept in all means/medians.",
    "one_empty": "Exactly one of GT / prediction empty: Dice = 0, HD95 = ASD = the image's physical diagonal "
                 "sqrt(sum((shape_i * spacing_i)^2)) (flags 'pred_empty' / 'gt_empty'), a finite worst-case "
                 "penalty so means stay defined.",
    "singleton_axes": "Axes of size 1 are dropped before scoring (2D slices stored as 3D).",
}

DEFINITIONS: dict[str, str] = {
    "surface": "mask voxels with a face neighbour outside the mask; outside the image counts as background",
    "hd95": "95th percentile (numpy linear interpolation) of the union of both directed surface-distance sets",
    "asd": "mean of the union of both directed surface-distance sets",
    "dice": "2|A and B| / (|A| + |B|)",
}

UNITS_NOTE = ("hd95 and asd are in the physical units of the image spacing as stored in the files "
              "(millimetres for NIfTI/DICOM-derived data); dice is unitless.")

# Extensions that live next to images but are never segmentations (nnU-Net writes json/npz/pkl into pred folders).
_NON_IMAGE_SUFFIXES = {".json", ".csv", ".txt", ".pkl", ".npz", ".npy", ".md", ".log", ".py", ".pdf"}


# ----------------------------------------------------------------------------------------------------- metrics
# nnU-Net's ``label_or_region_to_key`` / ``region_or_label_to_mask`` do the same, but importing
# nnunetv2.evaluation.evaluate_predictions pulls in torch (seconds per spawned worker) for two one-liners.

def label_or_region_to_key(label_or_region: LabelOrRegion) -> str:
    """Same key as nnU-Net's summary.json: ``"1"`` for a label, ``"(1, 2)"`` for a region."""
    return str(label_or_region)


def region_or_label_to_mask(seg: np.ndarray, label_or_region: LabelOrRegion) -> np.ndarray:
    """Boolean mask of one label, or of the union of a region's labels."""
    if isinstance(label_or_region, tuple):
        return np.isin(seg, label_or_region)
    return seg == label_or_region


def _drop_singleton_axes(*arrays: np.ndarray, spacing: Sequence[float]) -> tuple[list[np.ndarray], np.ndarray]:
    """Remove axes of size 1 (keeping at least one axis) so 2D slices stored as 3D are scored as 2D."""
    shape = arrays[0].shape
    keep = [i for i, s in enumerate(shape) if s > 1] or [0]
    sp = np.asarray(spacing, dtype=float)[keep]
    return [a.reshape([shape[i] for i in keep]) for a in arrays], sp


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask (the image border counts as outside)."""
    structure = generate_binary_structure(mask.ndim, 1)
    return mask & ~binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel.

    The distance transforms are the expensive part and only surface voxels matter, all of which lie inside this box;
    the one-voxel margin keeps the crop edge from creating surface that is not there in the full image.
    """
    coords = np.nonzero(gt | pred)
    sl = tuple(slice(max(int(c.min()) - 1, 0), min(int(c.max()) + 2, n)) for c, n in zip(coords, gt.shape, strict=True))
    return gt[sl], pred[sl]


def surface_distances(gt_mask: np.ndarray, pred_mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Union of both directed surface-distance sets (GT->pred then pred->GT). Both masks must be non-empty."""
    gt, pred = _crop_to_union(gt_mask, pred_mask)
    s_gt, s_pred = _surface(gt), _surface(pred)
    sp = [float(s) for s in spacing]
    d_to_pred = distance_transform_edt(~s_pred, sampling=sp)
    d_to_gt = distance_transform_edt(~s_gt, sampling=sp)
    return np.concatenate([d_to_pred[s_gt], d_to_gt[s_pred]])


def image_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Physical diagonal of the image: the worst-case distance penalty when exactly one mask is empty."""
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)) ** 2)))


def binary_metrics(gt_mask: np.ndarray, pred_mask: np.ndarray, spacing: Sequence[float]) -> dict[str, Any]:
    """Dice, HD95 and ASD of two boolean masks; ``spacing`` is per numpy axis, in physical units.

    Returns ``dice``, ``hd95``, ``asd`` and ``empty`` (``""``, ``both_empty``, ``pred_empty`` or ``gt_empty``) so that
    the caller can tell a real score from an empty-rule value (see the module docstring for the rules).
    """
    gt_mask = np.asarray(gt_mask, dtype=bool)
    pred_mask = np.asarray(pred_mask, dtype=bool)
    if gt_mask.shape != pred_mask.shape:
        raise ValueError(f"GT mask shape {gt_mask.shape} != prediction mask shape {pred_mask.shape}")
    if len(spacing) != gt_mask.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} entries for a {gt_mask.ndim}D mask")
    (gt_mask, pred_mask), sp = _drop_singleton_axes(gt_mask, pred_mask, spacing=spacing)

    n_gt, n_pred = int(gt_mask.sum()), int(pred_mask.sum())
    if n_gt == 0 and n_pred == 0:
        return {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "empty": "both_empty"}
    if n_gt == 0 or n_pred == 0:
        diag = image_diagonal(gt_mask.shape, sp)
        return {"dice": 0.0, "hd95": diag, "asd": diag, "empty": "pred_empty" if n_pred == 0 else "gt_empty"}

    dice = 2.0 * int(np.count_nonzero(gt_mask & pred_mask)) / (n_gt + n_pred)
    d = surface_distances(gt_mask, pred_mask, sp)
    return {"dice": float(dice), "hd95": float(np.percentile(d, 95)), "asd": float(d.mean()), "empty": ""}


def case_metrics(gt: np.ndarray, pred: np.ndarray, spacing: Sequence[float], labels: Iterable[LabelOrRegion],
                 ignore_label: int | None = None) -> list[dict[str, Any]]:
    """One row per label (or region, a tuple of labels) with dice, hd95, asd, gt_voxels, pred_voxels and empty.

    ``class`` is nnU-Net's key for the label or region (``"1"``, ``"(1, 2)"``) so rows line up with dataset.json.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"GT shape {gt.shape} != prediction shape {pred.shape}")
    valid = None if ignore_label is None else gt != ignore_label
    rows = []
    for lab in labels:
        gt_mask = region_or_label_to_mask(gt, lab)
        pred_mask = region_or_label_to_mask(pred, lab)
        if valid is not None:
            pred_mask &= valid
        m = binary_metrics(gt_mask, pred_mask, spacing)
        rows.append({"class": label_or_region_to_key(lab), "dice": m["dice"], "hd95": m["hd95"], "asd": m["asd"],
                     "gt_voxels": int(gt_mask.sum()), "pred_voxels": int(pred_mask.sum()), "empty": m["empty"]})
    return rows


# ----------------------------------------------------------------------------------------------------- files

def _file_ending(name: str) -> str:
    """``.nii.gz`` for NIfTI, otherwise the last suffix; double endings other than .nii.gz are not special."""
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def detect_file_ending(gt_dir: Path) -> str:
    """The single image file ending found in ``gt_dir``; ambiguous folders must be told the ending."""
    endings = {_file_ending(p.name) for p in gt_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    endings -= _NON_IMAGE_SUFFIXES | {""}
    if len(endings) != 1:
        raise ValueError(f"Cannot tell the segmentation file ending in {gt_dir}: found {sorted(endings) or 'none'}. "
                         "Pass file_ending (CLI: --file_ending), or a dataset.json with 'file_ending'.")
    return endings.pop()


def _header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...], int]:
    """Shape and spacing in numpy axis order, plus the number of components, without loading the pixels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return (tuple(int(s) for s in reversed(reader.GetSize())), tuple(float(s) for s in reversed(reader.GetSpacing())),
            int(reader.GetNumberOfComponents()))


def check_pair(gt_file: Path, pred_file: Path) -> None:
    """Refuse a GT/prediction pair whose shape or spacing differ: every metric would be meaningless."""
    g_shape, g_sp, g_nc = _header(gt_file)
    p_shape, p_sp, p_nc = _header(pred_file)
    if g_nc != 1 or p_nc != 1:
        raise ValueError(f"{pred_file.name}: segmentations must have one component per voxel "
                         f"(GT {g_nc}, prediction {p_nc})")
    if g_shape != p_shape:
        raise ValueError(f"Shape mismatch for {pred_file.name}: GT {gt_file} has shape {g_shape}, prediction "
                         f"{pred_file} has shape {p_shape} (numpy axis order)")
    if not np.allclose(g_sp, p_sp, rtol=1e-4, atol=1e-6):
        raise ValueError(f"Spacing mismatch for {pred_file.name}: GT {gt_file} has spacing {g_sp}, prediction "
                         f"{pred_file} has spacing {p_sp} (numpy axis order)")


def read_segmentation(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Integer label array and spacing, both in numpy axis order (SimpleITK reports x, y, z)."""
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"{path} holds non-integer values; expected a label map")
        arr = arr.astype(np.int64)
    return arr, tuple(float(s) for s in reversed(img.GetSpacing()))


def _unique_labels(path: Path) -> list[int]:
    return [int(v) for v in np.unique(read_segmentation(path)[0])]


def _evaluate_case(job: tuple[str, Path, Path, list[LabelOrRegion], int | None]) -> list[dict[str, Any]]:
    """Pool worker: read one pair and score it (top level so that it pickles)."""
    case, gt_file, pred_file, labels, ignore_label = job
    gt, spacing = read_segmentation(gt_file)
    pred, _ = read_segmentation(pred_file)
    if gt.shape != pred.shape:
        raise ValueError(f"Shape mismatch for {pred_file.name}: GT {gt.shape}, prediction {pred.shape}")
    known = {0} | {int(x) for lab in labels for x in (lab if isinstance(lab, tuple) else (lab,))}
    values, counts = np.unique(pred, return_counts=True)
    unexpected = {int(v): int(c) for v, c in zip(values, counts) if int(v) not in known and int(v) != ignore_label}
    rows = [{"case": case, **row} for row in case_metrics(gt, pred, spacing, labels, ignore_label)]
    return rows, unexpected


def _map(func, jobs: list, pool, desc: str) -> list:
    """Ordered map with a progress bar; in-process without a pool (no spawn cost, easy debugging)."""
    if pool is None:
        return [func(j) for j in tqdm(jobs, desc=desc)]
    return list(tqdm(pool.imap(func, jobs), total=len(jobs), desc=desc))


def _labels_from_dataset_json(ds: dict) -> tuple[list[LabelOrRegion], dict[str, str], int | None]:
    """Foreground labels/regions, their names and the ignore label from an nnU-Net dataset.json ``labels`` dict."""
    labels: list[LabelOrRegion] = []
    names: dict[str, str] = {}
    ignore = None
    for name, value in ds["labels"].items():
        if name == "ignore":
            ignore = int(value)
            continue
        lab: LabelOrRegion = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)
        if lab == 0 or lab == (0,) or name == "background":
            continue
        labels.append(lab)
        names[label_or_region_to_key(lab)] = name
    return labels, names, ignore


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}


def summarize(rows: list[dict[str, Any]], labels: Sequence[LabelOrRegion], class_names: dict[str, str]) -> dict:
    """Per-class mean/std/median (population std) and the foreground mean (mean of the class means)."""
    per_class: dict[str, dict[str, Any]] = {}
    for lab in labels:
        key = label_or_region_to_key(lab)
        sub = [r for r in rows if r["class"] == key]
        entry: dict[str, Any] = {"name": class_names.get(key, key), "n": len(sub)}
        for m in METRICS:
            entry[m] = _stats([r[m] for r in sub])
        for flag in ("both_empty", "pred_empty", "gt_empty"):
            entry[f"n_{flag}"] = sum(r["empty"] == flag for r in sub)
        per_class[key] = entry
    fg = {m: float(np.mean([per_class[k][m]["mean"] for k in per_class])) for m in METRICS}
    return {"per_class": per_class, "foreground_mean": fg}


def pair_cases(gt_files: list[Path], pred_dir: Path, ending: str,
               allow_missing: bool) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(case, GT file, prediction file) for every GT file with a prediction of the same name, and the names of
    those without one (an error unless ``allow_missing``)."""
    pairs: list[tuple[str, Path, Path]] = []
    missing: list[str] = []
    for g in gt_files:
        p = pred_dir / g.name
        if p.is_file():
            pairs.append((g.name[: -len(ending)], g, p))
        else:
            missing.append(g.name)
    if missing and not allow_missing:
        raise FileNotFoundError(f"No prediction in {pred_dir} for {len(missing)} GT case(s): {', '.join(missing)} "
                                "(use allow_missing / --allow-missing to skip them)")
    if missing:
        warnings.warn(f"Skipping {len(missing)} GT case(s) without prediction: {', '.join(missing)}", stacklevel=3)
    if not pairs:
        raise FileNotFoundError(f"No GT case in {gt_files[0].parent} has a prediction in {pred_dir}")
    return pairs, missing


def _unexpected_labels(pairs: list[tuple[str, Path, Path]], results: list, labels: list) -> dict[str, dict[str, Any]]:
    """Predicted labels outside the evaluated set score nowhere: count them (cases, voxels) and say so instead of
    dropping them silently."""
    unexpected: dict[str, dict[str, Any]] = {}
    for (case, _, _), (_, found) in zip(pairs, results, strict=True):
        for lab, n in found.items():
            entry = unexpected.setdefault(str(lab), {"cases": [], "voxels": 0})
            entry["cases"].append(case)
            entry["voxels"] += n
    if unexpected:
        warnings.warn("Predictions contain label(s) that are not among the evaluated labels "
                      f"{[label_or_region_to_key(lab) for lab in labels]}: " + "; ".join(
                          f"label {k} in {len(v['cases'])} case(s), {v['voxels']} voxels" for k, v in
                          unexpected.items()) + ". They count as background in every score; check the label "
                      "numbering of the predictions (see unexpected_predicted_labels in summary.json).", stacklevel=3)
    return unexpected


def evaluate_folders(gt_dir: str | os.PathLike, pred_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                     labels: Sequence[LabelOrRegion] | None = None, dataset_json: str | os.PathLike | None = None,
                     num_processes: int = 1, allow_missing: bool = False, file_ending: str | None = None) -> dict:
    """Score every GT case against the prediction of the same file name; write CSV, summary.json and box plot.

    Labels: ``labels`` if given, else the foreground labels of ``dataset_json``, else the union of non-zero values
    in the GT files. The file ending comes from ``file_ending``, ``dataset_json`` or the GT folder, in that order.
    Returns the summary dict that is also written to ``out_dir/summary.json`` (default ``pred_dir/sss_evaluation``).
    """
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    for d, what in ((gt_dir, "GT"), (pred_dir, "prediction")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} folder {d} does not exist")
    out = Path(out_dir) if out_dir is not None else pred_dir / "sss_evaluation"

    ds = json.loads(Path(dataset_json).read_text()) if dataset_json is not None else None
    ending = file_ending or (ds or {}).get("file_ending") or detect_file_ending(gt_dir)
    gt_files = sorted(p for p in gt_dir.iterdir() if p.is_file() and p.name.endswith(ending)
                      and not p.name.startswith("."))
    if not gt_files:
        raise FileNotFoundError(f"No '{ending}' files in GT folder {gt_dir}")

    pairs, missing = pair_cases(gt_files, pred_dir, ending, allow_missing)
    for _, g, p in pairs:  # header-only, so a bad pair fails before any pixels are loaded
        check_pair(g, p)

    class_names: dict[str, str] = {}
    ignore_label = None
    if ds is not None:
        ds_labels, class_names, ignore_label = _labels_from_dataset_json(ds)
        if labels is None:
            labels = ds_labels

    # spawn (as nnU-Net does): forking a parent that holds SimpleITK/OpenMP threads can deadlock; one pool serves
    # both passes so the start-up cost is paid once.
    n_workers = min(num_processes, len(pairs))
    with get_context("spawn").Pool(n_workers) if n_workers > 1 else nullcontext() as pool:
        if labels is None:
            found = _map(_unique_labels, [g for _, g, _ in pairs], pool, "reading GT labels")
            labels = sorted({v for vals in found for v in vals} - {0})
        labels = [tuple(int(x) for x in lab) if isinstance(lab, (list, tuple)) else int(lab) for lab in labels]
        if not labels:
            raise ValueError("No foreground labels to evaluate (GT is all background and no labels were given)")
        jobs = [(case, g, p, labels, ignore_label) for case, g, p in pairs]
        results = _map(_evaluate_case, jobs, pool, "evaluating")
    rows = [r for case_rows, _ in results for r in case_rows]
    unexpected = _unexpected_labels(pairs, results, labels)

    summary: dict[str, Any] = {
        "n_cases": len(pairs),
        "gt_dir": str(gt_dir),
        "pred_dir": str(pred_dir),
        "file_ending": ending,
        "labels": [label_or_region_to_key(lab) for lab in labels],
        "ignore_label": ignore_label,
        "skipped_missing_predictions": missing,
        "unexpected_predicted_labels": unexpected,
        **summarize(rows, labels, class_names),
        "units": UNITS_NOTE,
        "definitions": DEFINITIONS,
        "empty_rules": EMPTY_RULES,
        "std": "population standard deviation over cases (ddof=0)",
    }
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "per_case.csv")
    write_json(summary, out / "summary.json")
    plot_boxes(rows, summary, out / "boxplot.png")
    return summary
