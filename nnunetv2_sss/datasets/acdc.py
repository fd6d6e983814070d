"""ACDC in the SSL4MIS / UniMatch HDF5 layout -> an nnU-Net raw dataset with a standard low-label split.

The semi-supervised literature reports ACDC with 1, 3 or 7 labeled patients on this exact layout; converting it
(rather than the original NIfTI release) keeps our numbers comparable with those papers.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from nnunetv2_sss.datasets.label_budget import DatasetToolError, raw_root, staged_raw_dataset
from nnunetv2_sss.datasets.synthetic import write_nifti
from nnunetv2_sss.unlabeled.layout import unlabeled_raw_folder

# UniMatch's ACDC splits (patient numbers).
STANDARD_SPLITS: dict[str, tuple[int, ...]] = {
    "1": (99,),
    "3": (38, 50, 99),
    "7": (21, 38, 49, 50, 58, 99, 100),
}
ACDC_LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
# The HDF5 files store no spacing: one pixel is the in-plane unit; thick slices make nnU-Net plan slice-wise (2d).
ACDC_SPACING_ZYX = (10.0, 1.0, 1.0)
FILE_ENDING = ".nii.gz"
_FRAME_RE = re.compile(r"^patient(\d{3})_frame(\d{2})$")
_SLICE_RE = re.compile(r"^(patient\d{3}_frame\d{2})_slice_(\d+)\.h5$")


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetToolError(f"{path} not found: the ACDC folder must hold train.list and val.list beside data/ "
                               f"(SSL4MIS layout). Point -i at that folder.")
    frames = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    bad = [f for f in frames if not _FRAME_RE.match(f)]
    if bad:
        raise DatasetToolError(f"{path}: entries {', '.join(bad[:3])} are not frame names like patient038_frame01.")
    return frames


def parse_labeled(labeled: str, train_patients: set[int]) -> tuple[int, ...]:
    """Patients to keep labeled: '1', '3', '7' (standard splits), 'all', or a comma list such as '38,50,099'.

    Any other bare number is refused: '5' could mean five patients or patient 005."""
    spec = str(labeled).strip().lower()
    if spec == "all":
        return tuple(sorted(train_patients))
    if spec in STANDARD_SPLITS:
        patients = STANDARD_SPLITS[spec]
    elif spec.isdigit():
        # a bare number other than 1/3/7 reads as a count but would name one patient: refuse the guess
        raise DatasetToolError(
            f"--labeled {labeled!r} is ambiguous: counts have standard splits only for 1, 3 and 7 patients. For "
            f"patient {int(spec):03d} alone write --labeled patient{int(spec):03d} (or '{int(spec)},'); for several "
            f"patients give a comma list such as 38,50,99.")
    else:
        try:
            patients = tuple(sorted({int(p.strip().removeprefix("patient")) for p in spec.split(",") if p.strip()}))
        except ValueError:
            raise DatasetToolError(f"--labeled {labeled!r}: use 1, 3, 7, all, or a comma list of patient numbers "
                                   f"such as 38,50,99.") from None
        if not patients:
            raise DatasetToolError(f"--labeled {labeled!r} names no patient.")
    unknown = [p for p in patients if p not in train_patients]
    if unknown:
        raise DatasetToolError(f"--labeled: patient(s) {', '.join(f'{p:03d}' for p in unknown)} are not in train.list "
                               f"(training patients: {min(train_patients):03d}..{max(train_patients):03d}, "
                               f"{len(train_patients)} in all).")
    return patients


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f["image"][()], dtype=np.float32), np.asarray(f["label"][()])
    except (OSError, KeyError) as e:
        raise DatasetToolError(f"{path}: cannot read keys 'image' and 'label' ({e}). Re-download or remove it.") from e


def _check_label(label: np.ndarray, where: str) -> np.ndarray:
    extra = sorted(set(np.unique(label).tolist()) - set(ACDC_LABELS.values()))
    if extra:
        raise DatasetToolError(f"{where}: label values {extra} outside {{0, 1, 2, 3}}; this is not ACDC labelling.")
    return label.astype(np.uint8)


def _stack_frame(data: Path, frame: str, slices: dict[int, Path]) -> tuple[np.ndarray, np.ndarray]:
    """(Z, H, W) image and label from slice_1..slice_N, after checking the numbering has no gap."""
    if not slices:
        raise DatasetToolError(f"Frame {frame} is in train.list but {data} holds no {frame}_slice_K.h5 files.")
    numbers = sorted(slices)
    if numbers != list(range(1, len(numbers) + 1)):
        missing = sorted(set(range(1, numbers[-1] + 1)) - set(numbers))
        raise DatasetToolError(
            f"Frame {frame}: slices are not contiguous (have {numbers[0]}..{numbers[-1]}, missing "
            f"{', '.join(map(str, missing)) or 'slice_1'}) in {data}. Restore the missing {frame}_slice_K.h5 files; "
            f"a volume with a gap would put anatomy at the wrong depth.")
    images, labels = [], []
    for k in numbers:
        image, label = _read_h5(slices[k])
        if image.ndim != 2 or image.shape != label.shape or (images and image.shape != images[0].shape):
            raise DatasetToolError(f"{slices[k]}: image {image.shape} / label {label.shape} do not match the 2D "
                                   f"slice shape {images[0].shape if images else image.shape} of frame {frame}.")
        images.append(image)
        labels.append(label)
    return np.stack(images), _check_label(np.stack(labels), f"frame {frame}")


def convert_acdc(acdc_dir: Path | str, dataset_id: int = 27, labeled: str = "3", name: str | None = None,
                 overwrite: bool = False) -> Path:
    """Convert SSL4MIS-style ACDC HDF5 data to ``nnUNet_raw/DatasetXXX_Name`` and return that folder.

    Training frames (``train.list``, stored as 2D ``data/patientNNN_frameFF_slice_K.h5``) are re-stacked into
    (Z, H, W) volumes. Frames of the ``labeled`` patients (1, 3, 7: UniMatch's standard splits; 'all'; or a comma
    list of patient numbers) go to imagesTr/labelsTr, frames of every other training patient to imagesUnlabeled,
    the validation volumes (``val.list``, ``data/patientNNN_frameFF.h5``) to imagesTs/labelsTs. Cases are named
    like ``patient038_frame01``. The files hold no voxel spacing, so every volume is written with spacing
    (z, y, x) = (10.0, 1.0, 1.0): one pixel is the in-plane unit and slices are thick, so nnU-Net plans a
    slice-wise (2d-appropriate) setup; distances in evaluations are therefore in pixels in-plane. Images stay
    float32 as stored (scaled to [0, 1] per volume), labels are uint8 {0 background, 1 RV, 2 MYO, 3 LV}.
    Default name: 'ACDC' when all patients are labeled, else 'ACDC_<k>labeled'.
    """
    acdc_dir = Path(acdc_dir)
    data = acdc_dir / "data"
    if not data.is_dir():
        raise DatasetToolError(f"{data} not found: expected the SSL4MIS ACDC layout (data/*.h5, train.list, val.list) "
                               f"in {acdc_dir}.")
    train_frames = _read_list(acdc_dir / "train.list")
    val_frames = _read_list(acdc_dir / "val.list")
    slice_files: dict[str, dict[int, Path]] = {f: {} for f in train_frames}
    for p in data.iterdir():
        m = _SLICE_RE.match(p.name)
        if m and m.group(1) in slice_files:
            slice_files[m.group(1)][int(m.group(2))] = p
    train_patients = {int(_FRAME_RE.match(f).group(1)) for f in train_frames}
    labeled_patients = parse_labeled(labeled, train_patients)
    if name is None:
        name = "ACDC" if len(labeled_patients) == len(train_patients) else f"ACDC_{len(labeled_patients)}labeled"
    for f in val_frames:  # fail before writing anything
        if not (data / f"{f}.h5").is_file():
            raise DatasetToolError(f"{data / (f + '.h5')} not found, but {f} is in val.list. Restore the file or "
                                   f"remove the line from val.list.")

    n_lab = n_unl = 0
    with staged_raw_dataset(dataset_id, name, overwrite) as out:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (out / sub).mkdir()
        unlabeled = unlabeled_raw_folder(out)
        for frame in sorted(train_frames):
            image, label = _stack_frame(data, frame, slice_files[frame])
            if int(_FRAME_RE.match(frame).group(1)) in labeled_patients:
                write_nifti(image, out / "imagesTr" / f"{frame}_0000{FILE_ENDING}", ACDC_SPACING_ZYX)
                write_nifti(label, out / "labelsTr" / f"{frame}{FILE_ENDING}", ACDC_SPACING_ZYX)
                n_lab += 1
            else:
                unlabeled.mkdir(exist_ok=True)
                write_nifti(image, unlabeled / f"{frame}_0000{FILE_ENDING}", ACDC_SPACING_ZYX)
                n_unl += 1
        for frame in sorted(val_frames):
            image, label = _read_h5(data / f"{frame}.h5")
            if image.ndim != 3 or image.shape != label.shape:
                raise DatasetToolError(f"{data / (frame + '.h5')}: expected (Z, H, W) image and label of one shape, "
                                       f"got {image.shape} and {label.shape}.")
            write_nifti(image, out / "imagesTs" / f"{frame}_0000{FILE_ENDING}", ACDC_SPACING_ZYX)
            write_nifti(_check_label(label, str(data / f"{frame}.h5")), out / "labelsTs" / f"{frame}{FILE_ENDING}",
                        ACDC_SPACING_ZYX)
        generate_dataset_json(
            str(out), {0: "cineMRI"}, dict(ACDC_LABELS), n_lab, FILE_ENDING, dataset_name=name,
            reference="Bernard et al., IEEE TMI 2018 (ACDC); SSL4MIS/UniMatch HDF5 layout",
            license="ACDC terms of use (research only)", converted_by="nnunetv2_sss.datasets.acdc",
            description=f"ACDC with labeled patients {labeled!s}; spacing (z,y,x)={ACDC_SPACING_ZYX} is a "
                        "placeholder (pixels in-plane): the HDF5 files store none.",
            sss_acdc={"source": str(acdc_dir.resolve()), "labeled": str(labeled),
                      "labeled_patients": [f"patient{p:03d}" for p in labeled_patients]})
    dest = raw_root() / f"Dataset{dataset_id:03d}_{name}"
    print(f"{dest}: {n_lab} labeled training cases, {n_unl} unlabeled cases, {len(val_frames)} test cases")
    return dest
