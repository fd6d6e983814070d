"""Where unlabeled data, SAM-2 caches and SAM pseudo-labels live, in one place so every module agrees."""

from __future__ import annotations

from pathlib import Path

UNLABELED_RAW_FOLDER = "imagesUnlabeled"
UNLABELED_SUFFIX = "_unlabeled"
# nnU-Net infers the dataset class from the file endings at the top of the folder: metadata goes in a subfolder.
META_FOLDER = "sss_meta"
STAMP_FILE = "stamp.json"
SAM2_CACHE_SUFFIX = "_sam2_cache"
SAM_PSEUDOLABEL_FOLDER = "sam2_pseudolabels"


def unlabeled_raw_folder(raw_dataset_folder: str | Path) -> Path:
    """``nnUNet_raw/DatasetXXX/imagesUnlabeled``."""
    return Path(raw_dataset_folder) / UNLABELED_RAW_FOLDER


def unlabeled_preprocessed_folder(preprocessed_dataset_folder: str | Path, data_identifier: str) -> Path:
    """``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled``: beside the configuration's labeled data."""
    return Path(preprocessed_dataset_folder) / f"{data_identifier}{UNLABELED_SUFFIX}"


def sam2_cache_folder(unlabeled_folder: str | Path) -> Path:
    """SAM-2 image embeddings of every slice of the preprocessed unlabeled cases: ``<data_identifier>_sam2_cache``
    BESIDE ``<data_identifier>_unlabeled``, because re-preprocessing replaces that folder wholesale and the cache
    (hours on a CPU) must survive it; its per-case content hashes say which cases really changed."""
    folder = Path(unlabeled_folder)
    return folder.with_name(folder.name.removesuffix(UNLABELED_SUFFIX) + SAM2_CACHE_SUFFIX)


def sam_pseudolabel_folder(unlabeled_folder: str | Path) -> Path:
    """Default place of SAM-2 pseudo-label maps (one per unlabeled case) for tools that are not a training run;
    trainers keep theirs in the fold folder (``<fold>/sam2_pseudolabels``), so runs never share maps."""
    return Path(unlabeled_folder) / SAM_PSEUDOLABEL_FOLDER


def unlabeled_stamp_file(unlabeled_folder: str | Path) -> Path:
    """What the preprocessed unlabeled cases were made from (plans, files); a mismatch means stale."""
    return Path(unlabeled_folder) / META_FOLDER / STAMP_FILE
