"""Where unlabeled data, SAM-2 caches and SAM pseudo-labels live, in one place so every module agrees."""

from __future__ import annotations

from pathlib import Path

UNLABELED_RAW_FOLDER = "imagesUnlabeled"
UNLABELED_SUFFIX = "_unlabeled"
STAMP_FILE = "sss_unlabeled_stamp.json"
SAM2_CACHE_FOLDER = "sam2_cache"
SAM_PSEUDOLABEL_FOLDER = "sam2_pseudolabels"


def unlabeled_raw_folder(raw_dataset_folder: str | Path) -> Path:
    """``nnUNet_raw/DatasetXXX/imagesUnlabeled``."""
    return Path(raw_dataset_folder) / UNLABELED_RAW_FOLDER


def unlabeled_preprocessed_folder(preprocessed_dataset_folder: str | Path, data_identifier: str) -> Path:
    """``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled``: beside the configuration's labeled data."""
    return Path(preprocessed_dataset_folder) / f"{data_identifier}{UNLABELED_SUFFIX}"


def sam2_cache_folder(unlabeled_folder: str | Path) -> Path:
    """SAM-2 image embeddings of every slice of the preprocessed unlabeled cases."""
    return Path(unlabeled_folder) / SAM2_CACHE_FOLDER


def sam_pseudolabel_folder(unlabeled_folder: str | Path) -> Path:
    """SAM-2 pseudo-label maps (one per unlabeled case), rewritten at each refresh."""
    return Path(unlabeled_folder) / SAM_PSEUDOLABEL_FOLDER
