"""SAM-2 embedding cache of the preprocessed unlabeled cases: encode every slice once, decode prompts many times.

Layout (``<data_identifier>_sam2_cache/`` beside ``<data_identifier>_unlabeled/``, see ``layout.sam2_cache_folder``;
outside the unlabeled folder because re-preprocessing replaces that folder wholesale)::

    cache_key.json   the model the features were made with (checkpoint sha256, config, SAM image size, sam2
                     major.minor, windowing); a different key means every case must be re-encoded
    CASE.pt          per case: image_embed (Z, 256, S/16, S/16) and high_res_feats [(Z, 32, S/4, S/4),
                     (Z, 64, S/8, S/8)] as fp16, the slice size and the sha256 of the preprocessed image array

Staleness is decided by content, never by file times or package patch versions: a case is re-encoded only when the
sha256 of its preprocessed array changed (so a touched raw file, or re-preprocessing that gives the same arrays,
keeps the cache), the whole cache only when the model key changed. Slices are the first spatial axis of nnU-Net's
preprocessed data (C, Z, Y, X): the slice axis for 2D configurations.

A key mismatch rebuilds everything in ``<cache>.building/`` and swaps it in only when complete, so a trainer never
sees a half-old, half-new cache; with a matching key a rerun resumes. Builds hold an exclusive cross-process lock
(``<cache>.lock``, an OS file lock that dies with its process), so folds started together wait for one build
instead of racing on the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nnunetv2_sss.files import atomic_write, atomic_write_json, exclusive_lock, replace_folder
from nnunetv2_sss.sam.backend import WINDOW_PERCENTILES, SAM2Backend, to_sam_image, window_bounds
from nnunetv2_sss.unlabeled.layout import sam2_cache_folder, unlabeled_preprocessed_folder

CACHE_KEY_FILE = "cache_key.json"
CACHE_FORMAT = 2
BUILDING_SUFFIX = ".building"
TMP_SUFFIX = ".tmp"
LOCK_SUFFIX = ".lock"
_HASH_MEMO: dict[str, dict[str, Any]] = {}


# --- checkpoint hash -----------------------------------------------------------------------------------------------
def _hash_memo_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nnunetv2_sss" / "checkpoint_sha256.json"


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj, indent=1, sort_keys=True)


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 of the checkpoint, remembered by (path, size, mtime) so a trainer start does not re-hash 150 MB.

    The memo lives in memory and in ``$XDG_CACHE_HOME/nnunetv2_sss/checkpoint_sha256.json`` (default ~/.cache);
    an unwritable memo file only costs a re-hash next time.
    """
    p = Path(path).resolve()
    st = p.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo_file = _hash_memo_file()
    entry = _HASH_MEMO.get(str(p))
    if entry is None:
        try:
            entry = json.loads(memo_file.read_text()).get(str(p))
        except (OSError, ValueError):
            entry = None
    if entry and entry.get("size") == stamp["size"] and entry.get("mtime_ns") == stamp["mtime_ns"]:
        _HASH_MEMO[str(p)] = entry
        return entry["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    entry = {**stamp, "sha256": h.hexdigest()}
    _HASH_MEMO[str(p)] = entry
    try:
        memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    except (OSError, ValueError):
        memo = {}
    memo = {k: v for k, v in memo.items() if Path(k).is_file()}  # forget deleted (e.g. temporary) checkpoints
    memo[str(p)] = entry
    try:
        _write_json_atomic(memo_file, memo)
    except OSError:
        pass
    return entry["sha256"]


# --- key -----------------------------------------------------------------------------------------------------------
def make_cache_key(backend: SAM2Backend) -> dict:
    """What the cached features depend on besides the image itself (that is covered per case by its content hash).

    sam2 enters with major.minor only: a patch release does not change the encoder, and must not discard hours of
    features."""
    sam2_version = ".".join(version("sam2").split(".")[:2])
    return {
        "format": CACHE_FORMAT,
        "checkpoint_sha256": checkpoint_sha256(backend.checkpoint_path),
        "config": backend.config_name,
        "image_size": backend.image_size,
        "sam2_version": sam2_version,
        "windowing": f"per-case percentiles {WINDOW_PERCENTILES[0]}/{WINDOW_PERCENTILES[1]} -> uint8",
    }


def read_cache_key(cache_folder: str | Path) -> dict | None:
    """The stored key, or None if there is none (or it is unreadable)."""
    try:
        return json.loads((Path(cache_folder) / CACHE_KEY_FILE).read_text())
    except (OSError, ValueError):
        return None


def cache_is_valid(cache_folder: str | Path, key: dict, identifiers: list[str] | None = None) -> bool:
    """True if the folder's key equals ``key`` and, when ``identifiers`` is given, every case file is present."""
    if read_cache_key(cache_folder) != key:
        return False
    return all(case_cache_file(cache_folder, i).is_file() for i in identifiers or [])


def case_cache_file(cache_folder: str | Path, identifier: str) -> Path:
    return Path(cache_folder) / f"{identifier}.pt"


def content_sha256(data: np.ndarray) -> str:
    """sha256 of a preprocessed case array (dtype, shape and values): what its SAM-2 features depend on."""
    arr = np.ascontiguousarray(data)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


# --- lock ----------------------------------------------------------------------------------------------------------
def cache_lock_file(cache_folder: str | Path) -> Path:
    folder = Path(cache_folder)
    return folder.with_name(folder.name + LOCK_SUFFIX)


@contextmanager
def sam2_cache_lock(cache_folder: str | Path, poll_message: bool = True) -> Iterator[None]:
    """Exclusive cross-process lock for building ``cache_folder``; says so on stderr when it has to wait.

    An OS-level lock (``filelock``: flock on POSIX, msvcrt on Windows) is released by the kernel when its process
    dies, so a killed build never leaves a lock behind that blocks the next run."""
    lock_file = cache_lock_file(cache_folder)
    with exclusive_lock(lock_file, f"SAM-2 cache {cache_folder} is being built by another process (lock "
                                   f"{lock_file}): waiting for it" if poll_message else None):
        yield


# --- build ---------------------------------------------------------------------------------------------------------
def _stored_sha256(file: Path) -> str | None:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True).get("source_sha256")
    except Exception:  # a damaged case file is simply re-encoded
        return None


def _encode_case(data: np.ndarray, backend: SAM2Backend, batch_size: int) -> dict[str, Any]:
    """Encode every slice data[:, z] of a (C, Z, Y, X) case; features go to the CPU as fp16 as they come."""
    z_count = data.shape[1]
    bounds = window_bounds(data)
    out: dict[str, Any] = {}
    for start in range(0, z_count, batch_size):
        images = [to_sam_image(data[:, z], bounds) for z in range(start, min(start + batch_size, z_count))]
        feats = backend.encode(images[0]) if len(images) == 1 else backend.encode_batch(images)
        parts = [feats["image_embed"], *feats["high_res_feats"]]
        if not out:
            out["parts"] = [torch.empty((z_count, *t.shape[1:]), dtype=torch.float16) for t in parts]
        for dst, t in zip(out["parts"], parts, strict=True):
            dst[start:start + len(images)] = t.detach().to("cpu", torch.float16)
    image_embed, *high = out["parts"]
    return {"image_embed": image_embed, "high_res_feats": high, "bounds": torch.from_numpy(bounds)}


def build_sam2_cache(unlabeled_folder: str | Path, backend: SAM2Backend, plans_identifier: str | None = None,
                     configuration: str | None = None, data_identifier: str | None = None, batch_size: int = 1,
                     on_case_done: Callable[[str], None] | None = None, progress: bool = True) -> Path:
    """Encode every slice of every case in ``unlabeled_folder`` (nnU-Net preprocessed) and return the cache folder.

    Cases whose stored content hash equals their current array's are kept, others (new, changed, damaged) are
    encoded; files of cases that no longer exist are removed. The whole build holds ``sam2_cache_lock``: a second
    process waits and then finds the cache up to date. ``plans_identifier``, ``configuration`` and
    ``data_identifier`` are accepted for older callers and not used: the features depend on the arrays only, which
    the content hashes cover, and the folder is named after the unlabeled folder's data identifier.
    ``batch_size`` slices per encoder call (more helps on a GPU). ``on_case_done(identifier)`` runs after each case
    is written (progress hooks, tests).
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(unlabeled_folder)
    if not folder.is_dir() or not any(f.suffix in (".b2nd", ".npz") for f in folder.iterdir() if f.is_file()):
        raise FileNotFoundError(f"No preprocessed unlabeled cases in {folder}. Run nnUNetv2_sss_preprocess_unlabeled "
                                f"-d DATASET -c CONFIGURATION first.")
    key = make_cache_key(backend)
    final = sam2_cache_folder(folder)
    building = final.with_name(final.name + BUILDING_SUFFIX)
    with sam2_cache_lock(final, poll_message=progress):
        if read_cache_key(final) == key:
            work = final
            shutil.rmtree(building, ignore_errors=True)
        else:
            work = building
            if read_cache_key(building) != key:
                shutil.rmtree(building, ignore_errors=True)
                building.mkdir(parents=True)
                _write_json_atomic(building / CACHE_KEY_FILE, key)
        for f in work.glob(f"*{TMP_SUFFIX}"):
            f.unlink(missing_ok=True)

        ds = infer_dataset_class(str(folder))(str(folder))
        identifiers = list(ds.identifiers)
        for f in work.glob("*.pt"):
            if f.stem not in identifiers:
                f.unlink()
        bar = tqdm(identifiers, desc=f"SAM-2 cache ({backend.image_size}px)", unit="case", disable=not progress)
        for identifier in bar:
            data = np.asarray(ds.load_case(identifier)[0][:], dtype=np.float32)
            if data.ndim != 4:
                raise ValueError(f"{identifier} in {folder}: expected preprocessed data (C, Z, Y, X), got shape "
                                 f"{data.shape}. Re-run nnUNetv2_sss_preprocess_unlabeled for this configuration.")
            sha = content_sha256(data)
            target = case_cache_file(work, identifier)
            if target.is_file() and _stored_sha256(target) == sha:
                continue
            entry = _encode_case(data, backend, max(1, batch_size))
            entry.update(format=CACHE_FORMAT, identifier=identifier, source_sha256=sha,
                         orig_hw=[int(data.shape[2]), int(data.shape[3])], num_slices=int(data.shape[1]))
            atomic_write(target, lambda tmp, e=entry: torch.save(e, tmp))
            if on_case_done is not None:
                on_case_done(identifier)

        if work != final:
            replace_folder(work, final)
    return final


def build_sam2_cache_for_dataset(dataset_name_or_id: str | int, configuration: str, backend: SAM2Backend,
                                 plans_identifier: str = "nnUNetPlans", **kwargs: Any) -> Path:
    """``build_sam2_cache`` for ``nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled`` of a configuration."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        raise RuntimeError("nnUNet_preprocessed is not set: export it as for any nnU-Net command.")
    dataset_folder = Path(preprocessed) / maybe_convert_to_dataset_name(dataset_name_or_id)
    plans_file = dataset_folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: plan and preprocess the dataset first "
                                f"(nnUNetv2_plan_and_preprocess), or pass the right -p PLANS.")
    data_identifier = PlansManager(load_json(str(plans_file))).get_configuration(configuration).data_identifier
    folder = unlabeled_preprocessed_folder(dataset_folder, data_identifier)
    return build_sam2_cache(folder, backend, **kwargs)


# --- load ----------------------------------------------------------------------------------------------------------
def load_case_features(cache_folder: str | Path, identifier: str, z: int,
                       device: str | torch.device = "cpu") -> dict[str, Any]:
    """Features of slice ``z`` of a cached case, fp32 on ``device``, ready for ``predict_from_features``.

    The case file is memory-mapped, so only slice ``z`` is read from disk.
    """
    file = case_cache_file(cache_folder, identifier)
    if not file.is_file():
        raise FileNotFoundError(f"No SAM-2 features for case {identifier} in {cache_folder}: build the cache with "
                                f"nnUNetv2_sss_cache_sam2 -d DATASET -c CONFIGURATION.")
    d = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    n = d["num_slices"]
    if not -n <= z < n:
        raise IndexError(f"slice {z} out of range for case {identifier} ({n} slices)")
    z = z % n

    def take(t: torch.Tensor) -> torch.Tensor:
        return t[z:z + 1].to(device=device, dtype=torch.float32)

    return {"image_embed": take(d["image_embed"]), "high_res_feats": [take(t) for t in d["high_res_feats"]]}


def cached_case_info(cache_folder: str | Path, identifier: str) -> dict[str, Any]:
    """``num_slices`` and ``orig_hw`` (Y, X) of a cached case, without reading its features."""
    d = torch.load(case_cache_file(cache_folder, identifier), map_location="cpu", weights_only=True, mmap=True)
    return {"num_slices": int(d["num_slices"]), "orig_hw": tuple(int(v) for v in d["orig_hw"])}
