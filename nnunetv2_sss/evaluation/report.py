"""Writers for the evaluation outputs (CSV, JSON, box plot, console table), each written atomically.

A reader (another process, a crashed run, a notebook polling the folder) never sees a half-written file: every
output goes to a temporary name in the target folder and is moved into place with ``os.replace``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nnunetv2_sss.files import atomic_write

CSV_COLUMNS: tuple[str, ...] = ("case", "class", "dice", "hd95", "asd", "gt_voxels", "pred_voxels", "empty")
PLOT_METRICS: tuple[tuple[str, str], ...] = (("dice", "Dice"), ("hd95", "HD95"), ("asd", "ASD"))


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Per-case rows, one per (case, class); floats written with full precision for re-analysis."""
    def _write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return atomic_write(path, _write)


def write_json(obj: dict, path: str | os.PathLike) -> Path:
    """Strict JSON (``allow_nan=False``): the empty rules guarantee finite values, so a NaN here is a bug."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n"))


def plot_boxes(rows: Sequence[dict[str, Any]], summary: dict, path: str | os.PathLike) -> Path:
    """One panel per metric, one box per class. Uses the Agg canvas directly so no GUI backend or pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_class = summary["per_class"]
    keys = list(per_class)
    names = [f"{per_class[k]['name']}" if per_class[k]["name"] == k else f"{k}: {per_class[k]['name']}" for k in keys]
    fig = Figure(figsize=(4 + 1.2 * len(keys) * len(PLOT_METRICS) / 2, 4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (metric, title) in enumerate(PLOT_METRICS):
        ax = fig.add_subplot(1, len(PLOT_METRICS), i + 1)
        data = [[r[metric] for r in rows if r["class"] == k] for k in keys]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(keys) + 1), names, rotation=30 if len(keys) > 4 else 0)
        ax.set_title(title if metric == "dice" else f"{title} (physical units)")
        ax.set_xlabel("class")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"n = {summary['n_cases']} cases")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def format_table(summary: dict) -> str:
    """Plain-text per-class 'mean ± std' table for the console."""
    def row(label: str, cells: list[str]) -> str:
        return f"{label[:23]:<24}" + "".join(f"{c:>22}" for c in cells)

    lines = [row("class", [t for _, t in PLOT_METRICS])]
    for key, e in summary["per_class"].items():
        label = key if e["name"] == key else f"{key} {e['name']}"
        lines.append(row(label, [f"{e[m]['mean']:.4f} ± {e[m]['std']:.4f}" for m, _ in PLOT_METRICS]))
    fg = summary["foreground_mean"]
    lines.append(row("foreground mean", [f"{fg[m]:.4f}" + " " * 9 for m, _ in PLOT_METRICS]))
    lines.append(f"n cases: {summary['n_cases']}; {summary['units']}")
    return "\n".join(lines)
