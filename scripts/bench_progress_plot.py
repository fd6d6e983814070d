"""Seconds per epoch end spent drawing the progress figures: nnU-Net's alone, ours, and optionally ours at an older
commit (``--rev``), on a log of 50 epochs. Compare rows within one run only (other load on the machine changes all).

    python scripts/bench_progress_plot.py --rev b593e13
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnunetv2_sss.training import progress

ROOT = Path(__file__).resolve().parents[1]


def progress_at(rev: str):
    """``nnunetv2_sss/training/progress.py`` as it was at ``rev``, imported as a separate module."""
    src = subprocess.run(["git", "show", f"{rev}:nnunetv2_sss/training/progress.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"progress_{rev}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def seconds_per_plot(logger, epochs: int, repeats: int) -> float:
    for e in range(epochs):
        for k in logger.my_fantastic_logging:
            logger.log(k, [0.5, 0.5, 0.5] if k == "dice_per_class_or_region" else e / epochs, e)
    with tempfile.TemporaryDirectory() as folder:
        logger.plot_progress_png(folder)  # first call pays matplotlib's set-up
        t = time.perf_counter()
        for _ in range(repeats):
            logger.plot_progress_png(folder)
        return (time.perf_counter() - t) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", help="also time progress.py of this git revision")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rows = [("nnU-Net's LocalLogger", LocalLogger())]
    modules = [("ours (HEAD working tree)", progress)] + ([(f"ours at {a.rev}", progress_at(a.rev))] if a.rev else [])
    for name, m in modules:
        rows.append((name, m.SSSLocalLogger(m.LOSS_KEYS, m.FRACTION_KEYS + m.class_fraction_keys(3))))
    for name, logger in rows:
        print(f"{name}: {seconds_per_plot(logger, a.epochs, a.repeats):.2f} s per epoch end", flush=True)
    print(f"python {sys.version.split()[0]}; compare rows of this run only")


if __name__ == "__main__":
    main()
