"""Label budgets: a copy of an nnU-Net raw dataset in which only some cases (or patients) keep their labels.

Semi-supervised experiments need the same images with fewer labels; the cases that lose their labels move to
``imagesUnlabeled/`` so the SSS trainers can use them. This module also holds the staging helpers that every
dataset writer of this package shares: a dataset is written under a hidden temporary name beside its destination
and renamed at the end, so an interrupted run never leaves a half-written ``DatasetXXX_Name`` that nnU-Net would
pick up.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.utils import (
    get_filenames_of_train_images_and_targets,
    get_identifiers_from_splitted_dataset_folder,
)

from nnunetv2_sss.files import remove_stale
from nnunetv2_sss.unlabeled.layout import unlabeled_raw_folder

LABEL_BUDGET_FILE = "label_budget.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


class DatasetToolError(ValueError):
    """Bad input to a dataset tool; the message names the file or argument and what to do."""


# --------------------------------------------------------------------------------------------- shared staging


def raw_root() -> Path:
    """``nnUNet_raw``, read now (not at import) so tests and wrappers can set the variable late."""
    try:
        root = Path(nnUNet_raw.require())
    except RuntimeError as e:
        raise DatasetToolError(f"{e} Set it, e.g. export nnUNet_raw=/path/to/nnUNet_raw.") from None
    root.mkdir(parents=True, exist_ok=True)
    return root


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name`` after checking id and name, so a typo fails before anything is written."""
    if not isinstance(dataset_id, int) or isinstance(dataset_id, bool) or not 1 <= dataset_id <= 999:
        raise DatasetToolError(f"Dataset id must be an integer in 1..999 (nnU-Net uses 3 digits), got {dataset_id!r}.")
    if not _NAME_RE.match(name):
        raise DatasetToolError(f"Dataset name {name!r} is not usable in a folder name: use letters, digits, '_' or "
                               f"'-' (e.g. 'ACDC_3labeled').")
    return f"Dataset{dataset_id:03d}_{name}"


@contextmanager
def staged_raw_dataset(dataset_id: int, name: str, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``nnUNet_raw/DatasetXXX_Name`` in one rename.

    Any existing raw dataset with the same id (whatever its name) is refused unless ``overwrite``; nnU-Net resolves
    ids by folder prefix, so two names for one id would break every later command. A preprocessed or results folder
    with the same id but another name is refused for the same reason.
    """
    root = raw_root()
    target_name = dataset_folder_name(dataset_id, name)
    prefix = f"Dataset{dataset_id:03d}_"
    existing = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
    if existing and not overwrite:
        raise DatasetToolError(
            f"Dataset id {dataset_id} already exists: {', '.join(str(p) for p in existing)}. Choose another id, "
            f"delete that folder, or pass overwrite=True (--overwrite) to replace it.")
    for env in (nnUNet_preprocessed, nnUNet_results):
        if env.is_set() and Path(env.get()).is_dir():
            for p in Path(env.get()).iterdir():
                if p.is_dir() and p.name.startswith(prefix) and p.name != target_name:
                    raise DatasetToolError(
                        f"{p} uses dataset id {dataset_id} under another name than {target_name}; nnU-Net could no "
                        f"longer tell the two apart. Delete or rename {p}, or choose another id.")
    # leftovers of writers killed mid-way (hidden, so nnU-Net's id lookup never sees them) whose process is gone;
    # only beside a dataset that exists: a writer killed between its two renames left the old dataset as the only
    # copy, in '.<name>.old-<pid>', which must not be deleted
    for kept in existing:
        remove_stale(root / f".{kept.name}")
    tmp = root / f".{target_name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Move the old dataset aside first, so the destination is never a mix of old and new files.
    trash = []
    for p in existing:
        aside = root / f".{p.name}.old-{os.getpid()}"
        p.rename(aside)
        trash.append(aside)
    tmp.rename(root / target_name)
    for p in trash:
        shutil.rmtree(p, ignore_errors=True)
    if existing and nnUNet_preprocessed.is_set() and (Path(nnUNet_preprocessed.get()) / target_name).is_dir():
        print(f"Note: {Path(nnUNet_preprocessed.get()) / target_name} was made from the replaced raw data; run "
              f"nnUNetv2_plan_and_preprocess -d {dataset_id} again before training.")


def write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=4, sort_keys=False) + "\n")


# ---------------------------------------------------------------------------------------------- label budget


def _group_cases(cases: list[str], group_regex: str | None) -> dict[str, list[str]]:
    """Group key -> cases. The key is the regex's first group (or the whole match); one case per key without regex."""
    if group_regex is None:
        return {c: [c] for c in cases}
    try:
        pattern = re.compile(group_regex)
    except re.error as e:
        raise DatasetToolError(f"group_regex {group_regex!r} is not a valid regular expression: {e}.") from None
    groups: dict[str, list[str]] = {}
    unmatched = []
    for c in cases:
        m = pattern.search(c)
        if m is None:
            unmatched.append(c)
            continue
        groups.setdefault(m.group(1) if pattern.groups else m.group(0), []).append(c)
    if not groups:
        raise DatasetToolError(
            f"group_regex {group_regex!r} matches none of the {len(cases)} training cases (e.g. "
            f"{', '.join(cases[:3])}). Write a regex that finds the group in the case name, e.g. r'(patient\\d+)'.")
    if unmatched:
        raise DatasetToolError(
            f"group_regex {group_regex!r} matches no group in {len(unmatched)} case(s): {', '.join(unmatched[:5])}"
            f"{' ...' if len(unmatched) > 5 else ''}. Every training case needs a group; adjust the regex.")
    return groups


def _choose_groups(groups: dict[str, list[str]], n: int | None, fraction: float | None, cases: list[str] | None,
                   seed: int, unit: str) -> list[str]:
    keys = sorted(groups)
    if cases is not None:
        case_to_group = {c: g for g, cs in groups.items() for c in cs}
        chosen = []
        for c in cases:
            if c in groups:
                g = c
            elif c in case_to_group:
                g = case_to_group[c]
            else:
                raise DatasetToolError(
                    f"Unknown case {c!r}: it is not a training case (imagesTr) of the source"
                    f"{' nor a group key' if unit == 'groups' else ''}. Known {unit}: {', '.join(keys[:8])}"
                    f"{' ...' if len(keys) > 8 else ''}.")
            if g not in chosen:
                chosen.append(g)
        if not chosen:
            raise DatasetToolError("cases is empty: name at least one case to keep labeled.")
        return sorted(chosen)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DatasetToolError(f"n must be a positive integer, got {n!r}.")
        k = n
    else:
        if not 0.0 < float(fraction) <= 1.0:
            raise DatasetToolError(f"fraction must be in (0, 1], got {fraction!r}.")
        k = max(1, math.floor(float(fraction) * len(keys) + 0.5))
    if k > len(keys):
        raise DatasetToolError(f"n={k} is larger than the {len(keys)} available {unit} of the source. Use at most "
                               f"{len(keys)}.")
    rng = np.random.default_rng(seed)
    return sorted(keys[i] for i in rng.choice(len(keys), size=k, replace=False))


def _copy_case(images: list[str], dest_folder: Path, case: str, file_ending: str) -> None:
    dest_folder.mkdir(exist_ok=True)
    for c, f in enumerate(images):
        shutil.copy2(f, dest_folder / f"{case}_{c:04d}{file_ending}")


def _training_cases(src: Path) -> dict[str, dict]:
    """nnU-Net's listing of the source's training cases (images, label), each checked to be complete."""
    # nnU-Net's helper rewrites the paths of an explicit 'dataset' listing in place: give it its own copy.
    dataset_json = json.loads((src / "dataset.json").read_text())
    n_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    training = get_filenames_of_train_images_and_targets(str(src), dataset_json)
    if not training:
        raise DatasetToolError(f"{src} has no training cases (imagesTr/labelsTr); nothing to select from.")
    for case, entry in training.items():
        missing = [f for f in entry["images"] + [entry["label"]] if not os.path.isfile(f)]
        if len(entry["images"]) != n_channels:
            raise DatasetToolError(f"Training case {case!r} of {src} has {len(entry['images'])} channel file(s) but "
                                   f"dataset.json declares {n_channels}. Fix the source dataset first.")
        if missing:
            raise DatasetToolError(f"Training case {case!r} of {src}: missing file(s) {', '.join(missing)}. Fix the "
                                   f"source dataset first.")
    return training


def _source_unlabeled_cases(src_unlabeled: Path, file_ending: str, training: dict) -> list[str]:
    """Ids of the source's own unlabeled images; none may share an id with a training case."""
    if not src_unlabeled.is_dir():
        return []
    ids = [str(i) for i in get_identifiers_from_splitted_dataset_folder(str(src_unlabeled), file_ending)]
    clash = sorted(set(ids) & set(training))
    if clash:
        raise DatasetToolError(f"Case(s) {', '.join(clash[:5])} exist both in imagesTr and imagesUnlabeled of "
                               f"{src_unlabeled.parent}; rename one of them.")
    return ids


def _copy_cases(src: Path, out: Path, training: dict, labeled: list[str], unlabeled: list[str],
                file_ending: str) -> None:
    """Labeled cases with their labels, the other training cases and the source's unlabeled images as unlabeled,
    and the test folders as they are."""
    (out / "imagesTr").mkdir()
    (out / "labelsTr").mkdir()
    for case in labeled:
        _copy_case(training[case]["images"], out / "imagesTr", case, file_ending)
        shutil.copy2(training[case]["label"], out / "labelsTr" / f"{case}{file_ending}")
    dest_unlabeled = unlabeled_raw_folder(out)
    for case in unlabeled:
        _copy_case(training[case]["images"], dest_unlabeled, case, file_ending)
    src_unlabeled = unlabeled_raw_folder(src)
    if src_unlabeled.is_dir():
        dest_unlabeled.mkdir(exist_ok=True)
        for f in sorted(src_unlabeled.iterdir()):
            if f.is_file() and f.name.endswith(file_ending):
                shutil.copy2(f, dest_unlabeled / f.name)
    for sub in ("imagesTs", "labelsTs"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, out / sub)


def make_label_budget(source: str | int, new_id: int, n: int | None = None, fraction: float | None = None,
                      cases: list[str] | None = None, group_regex: str | None = None, seed: int = 0,
                      name: str | None = None, overwrite: bool = False) -> Path:
    """Copy raw dataset ``source`` to ``new_id``, keeping labels only for the chosen cases (or groups).

    Exactly one of ``n`` (number of cases/groups drawn with ``seed``), ``fraction`` (of cases/groups, rounded, at
    least one) or ``cases`` (case ids, or group keys when ``group_regex`` is set) selects what stays labeled. With
    ``group_regex`` (e.g. ``r"(patient\\d+)"``) all cases of a chosen group stay labeled together, so frames of one
    patient never end up on both sides. The other training cases (all channels) go to ``imagesUnlabeled/``; the
    source's own unlabeled images stay unlabeled; ``imagesTs``/``labelsTs`` are copied. ``label_budget.json``
    records the source, the selection and the seed. Returns the new dataset folder.
    """
    if sum(x is not None for x in (n, fraction, cases)) != 1:
        raise DatasetToolError("Give exactly one of n, fraction or cases to say which cases keep their labels.")
    source_name = maybe_convert_to_dataset_name(source)
    src = raw_root() / source_name
    if not (src / "dataset.json").is_file():
        raise DatasetToolError(f"{src / 'dataset.json'} not found: '{source}' is not an nnU-Net raw dataset in "
                               f"nnUNet_raw={raw_root()}.")
    if int(source_name[7:10]) == new_id:
        raise DatasetToolError(f"new_id {new_id} is the id of the source {source_name}; choose another id.")
    dataset_json = json.loads((src / "dataset.json").read_text())
    file_ending = dataset_json["file_ending"]

    training = _training_cases(src)
    src_unlabeled_ids = _source_unlabeled_cases(unlabeled_raw_folder(src), file_ending, training)

    unit = "groups" if group_regex is not None else "cases"
    groups = _group_cases(sorted(training), group_regex)
    chosen = _choose_groups(groups, n, fraction, cases, seed, unit)
    labeled = sorted(c for g in chosen for c in groups[g])
    unlabeled = sorted(set(training) - set(labeled))

    if name is None:
        name = f"{source_name[11:]}_{len(chosen)}{'groups' if group_regex else 'cases'}"
    with staged_raw_dataset(new_id, name, overwrite) as out:
        _copy_cases(src, out, training, labeled, unlabeled, file_ending)
        new_json = {k: v for k, v in dataset_json.items() if k != "dataset"}  # files now follow the standard layout
        new_json["numTraining"] = len(labeled)
        new_json["name"] = name
        write_json(new_json, out / "dataset.json")
        write_json({
            "source": source_name,
            "source_folder": str(src),
            "selection": {"n": n, "fraction": fraction, "cases": cases, "group_regex": group_regex,
                          "unit": unit, "chosen": chosen},
            "seed": seed,
            "labeled_cases": labeled,
            "unlabeled_cases": unlabeled,
            "source_unlabeled_cases": src_unlabeled_ids,
        }, out / LABEL_BUDGET_FILE)
    dest = raw_root() / dataset_folder_name(new_id, name)
    print(f"{dest}: {len(labeled)} labeled training case(s) ({len(chosen)} {unit}), "
          f"{len(unlabeled) + len(src_unlabeled_ids)} unlabeled case(s)")
    return dest
