"""Files and folders that are never half-written, and cleaning up after writers that were killed.

The bottom floor of the package: it imports nothing from ``nnunetv2_sss``, and every module that writes a file a
reader may see (checkpoints, caches, pseudo-label maps, plans, reports, figures) writes it through here.

* A file is written to ``<name>.<pid>.tmp[suffix]`` next to its final name and renamed over it in one step
  (``os.replace``), so a reader sees the old file or the new one, whole; ``durable=True`` also fsyncs the file and
  its folder (checkpoints: the rename survives a power cut).
* A folder is built under a work name and swapped in with ``replace_folder``: the old one is moved aside to
  ``<name>.old-<pid>`` first and deleted only after the swap.
* Leftovers of writers whose process is gone are recognised by the pid in their name (``remove_stale``).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (temporary files of dead writers may be removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_name(final: Path, suffix: str = "") -> Path:
    """``<final>.<pid>.tmp<suffix>``: this process's work file for ``final`` (``suffix`` keeps a file type that a
    writer infers from the name, e.g. '.png' for matplotlib, '.b2nd' for blosc2)."""
    return final.with_name(f"{final.name}.{os.getpid()}.tmp{suffix}")


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "",
                 durable: bool = False) -> Path:
    """Call ``write(tmp)`` on this process's temporary name for ``path``, then rename it over ``path``; on any
    error the temporary file is removed and ``path`` is untouched."""
    final = Path(path)
    tmp = temporary_name(final, suffix)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(final.parent)
    return final


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, **dumps_kwargs)))


def atomic_torch_save(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save``, durable: readers see the old file or the new one, whole, even after a power cut."""
    import torch

    final = atomic_write(path, lambda tmp: torch.save(obj, tmp), durable=True)
    remove_stale(final)
    return final


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """A matplotlib figure as PNG, atomically."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs), suffix=".png")


def replace_folder(work: Path, final: Path) -> Path:
    """Make the complete folder ``work`` become ``final``; the old ``final`` goes aside first and is deleted after."""
    old = final.with_name(f"{final.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


_STALE = r"\.(?:(\d+)\.tmp.*|(?:tmp|old)-(\d+).*)"


def remove_stale(final: Path) -> list[Path]:
    """Delete the leftovers of writers of ``final`` whose process is gone (``<name>.<pid>.tmp*``,
    ``<name>.tmp-<pid>``, ``<name>.old-<pid>``, files or folders); a live writer's files are left alone."""
    pattern = re.compile(re.escape(final.name) + _STALE + "$")
    removed = []
    for p in final.parent.glob(f"{glob_escape(final.name)}.*"):
        m = pattern.match(p.name)
        if m is None:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid != os.getpid() and not pid_alive(pid):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextmanager
def exclusive_lock(lock_file: Path, waiting_message: str | None) -> Iterator[None]:
    """An exclusive lock on ``lock_file`` (fcntl: the kernel releases it when its process dies, so a killed writer
    never blocks the next run; the file is never deleted): a second caller prints ``waiting_message`` and waits."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_message:
                print(waiting_message, file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
