"""Preprocess ``imagesUnlabeled`` with nnU-Net's own preprocessor and the dataset's plans.

The output sits beside the configuration's labeled data (``<data_identifier>_unlabeled``) so that the unlabeled
patches a trainer sees went through exactly the same transpose, crop, normalisation and resampling as the labeled
ones. A stamp records what the output was made from; a trainer re-runs this when the stamp no longer matches.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import multiprocessing
import os
import shutil
import struct
import sys
import zlib
from importlib.metadata import version
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle, write_pickle
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from tqdm import tqdm

from nnunetv2_sss.files import exclusive_lock, remove_stale, replace_folder
from nnunetv2_sss.unlabeled.layout import (
    META_FOLDER,
    unlabeled_preprocessed_folder,
    unlabeled_raw_folder,
    unlabeled_stamp_file,
)

MANIFEST_FILE = "manifest.json"


class UnlabeledDataError(RuntimeError):
    """Bad unlabeled input: the message says which file and what to do."""


def find_unlabeled_cases(raw_dataset_folder: Path, dataset_json: dict) -> dict[str, list[str]]:
    """Map case id -> channel files of ``imagesUnlabeled``, checked against imagesTr's conventions."""
    folder = unlabeled_raw_folder(raw_dataset_folder)
    file_ending = dataset_json["file_ending"]
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if not folder.is_dir():
        raise UnlabeledDataError(
            f"No unlabeled images: {folder} does not exist. Put unlabeled images there as CASE_0000{file_ending} "
            f"(same channels and file ending as imagesTr), or train with a supervised trainer such as nnUNetTrainer.")
    cases: dict[str, dict[int, str]] = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or f.is_dir():
            continue
        if not f.name.endswith(file_ending):
            raise UnlabeledDataError(
                f"{f}: file ending differs from imagesTr ('{file_ending}' in dataset.json). Convert it to "
                f"{file_ending} or remove it from {folder}.")
        stem = f.name[: -len(file_ending)]
        if len(stem) < 6 or stem[-5] != "_" or not stem[-4:].isdigit():
            raise UnlabeledDataError(
                f"{f}: expected the nnU-Net name CASE_XXXX{file_ending} (4-digit channel index). Rename it, "
                f"e.g. {stem}_0000{file_ending}.")
        cases.setdefault(stem[:-5], {})[int(stem[-4:])] = str(f)
    if not cases:
        raise UnlabeledDataError(
            f"{folder} holds no images. Semi-supervised trainers need unlabeled images there "
            f"(CASE_0000{file_ending}); without them train a supervised trainer such as nnUNetTrainer.")
    result = {}
    for case, channels in cases.items():
        if sorted(channels) != list(range(n_channels)):
            raise UnlabeledDataError(
                f"Unlabeled case '{case}' in {folder} has channel files {sorted(channels)} but dataset.json declares "
                f"{n_channels} channel(s) ({dataset_json.get('channel_names')}): provide exactly "
                + ", ".join(f"{case}_{c:04d}{file_ending}" for c in range(n_channels)) + ".")
        result[case] = [channels[c] for c in range(n_channels)]
    return result


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file needs (voxel offset + voxel data) according to its header; None if not NIfTI."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    n = int(np.prod([max(int(d), 1) for d in dims[1:1 + max(int(dims[0]), 0)]]))
    return max(offset, 348) + n * bitpix // 8


def verify_image_file(path: str | Path) -> None:
    """Refuse an input image that would be read wrongly: SimpleITK zero-fills a truncated ``.nii.gz`` without an
    error, and nnU-Net fails on 4D or vector images with an IndexError. The gzip stream must end cleanly, a NIfTI
    file must hold every voxel its header declares, and the image must be one 2D or 3D scalar image."""
    path = Path(path)
    what = "Replace it with a complete copy (e.g. convert or download it again), or remove it from the folder."
    if path.name.endswith(".gz"):
        n_bytes, head = 0, b""
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    head = head or chunk[:540]
                    n_bytes += len(chunk)
        except (EOFError, OSError, zlib.error) as e:
            raise UnlabeledDataError(f"{path}: the gzip stream is truncated or corrupt ({type(e).__name__}: {e}); "
                                     f"SimpleITK would read the missing part as zeros. {what}") from None
    else:
        with open(path, "rb") as f:
            head = f.read(540)
        n_bytes = path.stat().st_size
    if path.name.endswith((".nii", ".nii.gz")):
        expected = _nifti_expected_bytes(head)
        if expected is not None and n_bytes < expected:
            raise UnlabeledDataError(f"{path}: holds {n_bytes} bytes but its NIfTI header declares {expected} "
                                     f"(voxels missing: the file is truncated). {what}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise UnlabeledDataError(f"{path}: not a readable image ({str(e).strip().splitlines()[-1][:200]}). "
                                 f"{what}") from None
    size, comps = tuple(reader.GetSize()), reader.GetNumberOfComponents()
    if reader.GetDimension() not in (2, 3) or comps != 1:
        raise UnlabeledDataError(
            f"{path}: image of size {size} (x, y, ...) with {comps} component(s) per voxel, but nnU-Net expects one "
            f"2D or 3D scalar image per file. Split it: channels/components into CASE_0000, CASE_0001, ... files "
            f"(and declare them in dataset.json channel_names), time frames into separate cases.")


def _stamp(cases: dict[str, list[str]], plans: dict, plans_identifier: str, configuration: str,
           configuration_manager: ConfigurationManager) -> dict:
    def sha(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

    return {
        "plans_identifier": plans_identifier,
        "configuration": configuration,
        "data_identifier": configuration_manager.data_identifier,
        "configuration_sha256": sha(configuration_manager.configuration),
        "plans_sha256": sha({k: plans.get(k) for k in (
            "transpose_forward", "transpose_backward", "foreground_intensity_properties_per_channel",
            "image_reader_writer", "original_median_spacing_after_transp")}),
        "files": {c: [[Path(f).name, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in fs]
                  for c, fs in sorted(cases.items())},
        "nnunetv2": version("nnunetv2"),
    }


def _load_context(dataset: str | int, configuration: str, plans_identifier: str):
    dataset_name = maybe_convert_to_dataset_name(dataset)
    pre = Path(nnUNet_preprocessed.require()) / dataset_name
    plans_file = pre / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise UnlabeledDataError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first.")
    plans = load_json(str(plans_file))
    plans_manager = PlansManager(plans)
    if configuration not in plans["configurations"]:
        raise UnlabeledDataError(f"Configuration '{configuration}' is not in {plans_file} "
                                 f"(available: {', '.join(plans['configurations'])}).")
    configuration_manager = plans_manager.get_configuration(configuration)
    dataset_json = load_json(str(pre / "dataset.json"))
    raw = Path(nnUNet_raw.require()) / dataset_name
    return dataset_name, pre, raw, plans, plans_manager, configuration_manager, dataset_json


def is_up_to_date(dataset: str | int, configuration: str, plans_identifier: str = "nnUNetPlans") -> bool:
    """True when the preprocessed unlabeled cases match the current plans and raw files."""
    _, pre, raw, plans, _, cm, dataset_json = _load_context(dataset, configuration, plans_identifier)
    out = unlabeled_preprocessed_folder(pre, cm.data_identifier)
    stamp_file = unlabeled_stamp_file(out)
    if not stamp_file.is_file():
        return False
    cases = find_unlabeled_cases(raw, dataset_json)
    return json.loads(stamp_file.read_text()) == _stamp(cases, plans, plans_identifier, configuration, cm) and \
        not missing_outputs(out, cases)


def _write_manifest(folder: Path, cases: dict[str, list[str]]) -> None:
    """Every file preprocessing wrote (name, size), so damage after the fact is detected."""
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    for case in cases:
        if f"{case}.pkl" not in files or not any(n.startswith(case + ".") and not n.endswith(".pkl") for n in files):
            raise UnlabeledDataError(f"Preprocessing wrote no data or properties for unlabeled case '{case}' in "
                                     f"{folder}; run nnUNetv2_sss_preprocess_unlabeled again with --force.")
    (folder / META_FOLDER / MANIFEST_FILE).write_text(json.dumps(files, indent=0))


def missing_outputs(folder: str | Path, cases: dict[str, list[str]] | None = None) -> list[str]:
    """Files of the preprocessed unlabeled output that are missing or have another size than when written
    (empty list = complete). Without a manifest (older output) everything counts as missing."""
    folder = Path(folder)
    manifest = folder / META_FOLDER / MANIFEST_FILE
    if not manifest.is_file():
        return [str(manifest)]
    files = json.loads(manifest.read_text())
    bad = [n for n, size in files.items() if not (folder / n).is_file() or (folder / n).stat().st_size != size]
    if cases is not None:
        bad += [f"{c}.pkl" for c in cases if f"{c}.pkl" not in files]
    return bad


def _training_data_is_2d(preprocessed_dataset_folder: Path) -> bool | None:
    fp = preprocessed_dataset_folder / "dataset_fingerprint.json"
    if not fp.is_file():
        return None
    shapes = load_json(str(fp))["shapes_after_crop"]
    return all(s[0] == 1 for s in shapes)


def _preprocess_one(args) -> str:
    """Worker: nnU-Net's own run_case_save, then the properties nnU-Net's loader needs for an unlabeled case."""
    case, files, out_trunc, plans_manager, configuration_manager, dataset_json, train_is_2d = args
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    try:
        preprocessor.run_case_save(out_trunc, files, None, plans_manager, configuration_manager, dataset_json)
    except Exception as e:  # noqa: BLE001 - re-raised with the file names the user needs
        raise UnlabeledDataError(
            f"Could not preprocess unlabeled case '{case}' ({', '.join(files)}): {type(e).__name__}: {e}. Check that "
            f"the file(s) are readable {dataset_json['file_ending']} images like those in imagesTr.") from e
    props = load_pickle(out_trunc + ".pkl")
    shape = props["shape_before_cropping"]
    if train_is_2d is not None and (shape[0] == 1) != train_is_2d and len(shape) == 3:
        kind, other = ("3D", "2D") if train_is_2d else ("2D", "3D")
        raise UnlabeledDataError(
            f"Unlabeled case '{case}' ({files[0]}) is {kind} (shape {tuple(shape)}) but the labeled training images "
            f"are {other}. Unlabeled images must have the same dimensionality as imagesTr.")
    label_manager = plans_manager.get_label_manager(dataset_json)
    keys = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    # nnU-Net's loader looks up class_locations even without foreground oversampling; an unlabeled case has none.
    props["class_locations"] = {tuple(k) if isinstance(k, list) else k: np.zeros((0, 4), dtype=np.int64)
                                for k in keys}
    if label_manager.has_ignore_label:
        props["class_locations"][tuple([-1] + label_manager.all_labels)] = np.zeros((0, 4), dtype=np.int64)
    props["sss_unlabeled"] = True
    write_pickle(props, out_trunc + ".pkl")
    return case


def preprocessing_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """Exclusive lock on ``<out>.lock`` beside the output: folds started together wait for the one that
    preprocesses instead of writing and renaming the same folder at once."""
    lock_file = out.with_name(out.name + ".lock")
    return exclusive_lock(lock_file, f"Waiting for another process that preprocesses {out} (lock {lock_file}) ...")


def preprocess_unlabeled(dataset: str | int, configuration: str, plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 2, force: bool = False) -> Path:
    """Preprocess every unlabeled case; skip when the existing output is up to date and complete (unless ``force``).

    Input images are verified first (truncated or 4D files are refused). The whole output is written under a
    temporary name and renamed at the end, so an interrupted run never leaves a folder that looks complete; a lock
    makes concurrent callers (folds started together) wait for each other.
    """
    dataset_name, pre, raw, plans, plans_manager, cm, dataset_json = _load_context(
        dataset, configuration, plans_identifier)
    out = unlabeled_preprocessed_folder(pre, cm.data_identifier)
    cases = find_unlabeled_cases(raw, dataset_json)
    stamp = _stamp(cases, plans, plans_identifier, configuration, cm)
    stamp_file = unlabeled_stamp_file(out)
    with preprocessing_lock(out):
        remove_stale(out)  # work folders of interrupted runs whose process is gone
        if not force and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
            missing = missing_outputs(out, cases)
            if not missing:
                return out
            print(f"{out} is incomplete ({len(missing)} file(s) missing or changed, e.g. {missing[0]}): "
                  f"preprocessing the unlabeled cases again.", file=sys.stderr, flush=True)
        for case, fs in tqdm(list(cases.items()), desc="Verifying unlabeled images"):
            for f in fs:
                try:
                    verify_image_file(f)
                except UnlabeledDataError as e:
                    raise UnlabeledDataError(f"Could not preprocess unlabeled case '{case}': {e}") from None
        return _preprocess_all(out, cases, stamp, pre, plans_manager, cm, dataset_json, dataset_name, configuration,
                               num_processes)


def _preprocess_all(out: Path, cases: dict[str, list[str]], stamp: dict, pre: Path, plans_manager: PlansManager,
                    cm: ConfigurationManager, dataset_json: dict, dataset_name: str, configuration: str,
                    num_processes: int) -> Path:
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train_is_2d = _training_data_is_2d(pre)
    jobs = [(c, fs, str(tmp / c), plans_manager, cm, dataset_json, train_is_2d) for c, fs in cases.items()]
    try:
        desc = f"Preprocessing unlabeled cases ({dataset_name}, {configuration})"
        if num_processes <= 1:
            for j in tqdm(jobs, desc=desc):
                _preprocess_one(j)
        else:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                for _ in tqdm(pool.imap_unordered(_preprocess_one, jobs), total=len(jobs), desc=desc):
                    pass
        stamp_out = unlabeled_stamp_file(tmp)
        stamp_out.parent.mkdir(parents=True, exist_ok=True)
        _write_manifest(tmp, cases)
        stamp_out.write_text(json.dumps(stamp, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return replace_folder(tmp, out)
