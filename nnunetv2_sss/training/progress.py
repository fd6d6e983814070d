"""nnU-Net's progress.png with one more panel: the unsupervised terms, confident-pixel fraction and SAM agreement."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402


class SSSLocalLogger(LocalLogger):
    """nnU-Net's local logger that knows the SSS keys and draws them under nnU-Net's own panels."""

    loss_keys: Sequence[str] = ()
    fraction_keys: Sequence[str] = ()

    def __init__(self, loss_keys: Sequence[str], fraction_keys: Sequence[str], verbose: bool = False):
        super().__init__(verbose)
        self.loss_keys, self.fraction_keys = tuple(loss_keys), tuple(fraction_keys)
        self.add_missing_keys()

    def add_missing_keys(self) -> None:
        """Register our keys (nnU-Net rejects unknown ones); also after loading an older checkpoint's log."""
        for k in (*self.loss_keys, *self.fraction_keys):
            self.my_fantastic_logging.setdefault(k, [])

    def load_checkpoint(self, checkpoint: dict) -> None:
        super().load_checkpoint(checkpoint)
        n = len(self.my_fantastic_logging.get("train_losses", []))
        for k in (*self.loss_keys, *self.fraction_keys):
            vals = self.my_fantastic_logging.setdefault(k, [])
            vals.extend([float("nan")] * (n - len(vals)))

    def plot_progress_png(self, output_folder: str) -> None:
        super().plot_progress_png(output_folder)
        path = Path(output_folder) / "progress.png"
        stock = plt.imread(path)
        epoch = min(len(v) for v in self.my_fantastic_logging.values()) - 1
        x = list(range(epoch + 1))
        h, w = stock.shape[:2]
        panel_h = h / 3
        total = h + panel_h
        fig = plt.figure(figsize=(w / 100, total / 100), dpi=100)
        ax_img = fig.add_axes((0, panel_h / total, 1, h / total))  # the stock figure, pixel for pixel
        ax_img.imshow(stock, aspect="auto")
        ax_img.axis("off")
        bottom, legend_room = 110, 150  # pixels for the x label below and the legends above the panel
        ax = fig.add_axes((0.08, bottom / total, 0.84, (panel_h - bottom - legend_room) / total))
        for k in self.loss_keys:
            ax.plot(x, self.my_fantastic_logging[k][: epoch + 1], ls="-", label=k.removeprefix("sss_"), linewidth=4)
        ax.set_xlabel("epoch", fontsize=30)
        ax.set_ylabel("unsupervised loss", fontsize=30)
        ax.tick_params(labelsize=24)
        ax2 = ax.twinx()
        lowest = 0.0  # fractions and agreement live in [0, 1]; the DFE cosine similarity may go negative
        for k in self.fraction_keys:
            vals = np.asarray(self.my_fantastic_logging[k][: epoch + 1], dtype=float)
            ax2.plot(x, vals, ls="dotted", label=k.removeprefix("sss_"), linewidth=4)
            if np.isfinite(vals).any():
                lowest = min(lowest, float(np.nanmin(vals)))
        ax2.set_ylabel("fraction / agreement", fontsize=30)
        ax2.set_ylim(lowest - 0.05, 1.05)
        ax2.tick_params(labelsize=24)
        ax.legend(loc=(0, 1), fontsize=24, ncol=3)
        ax2.legend(loc=(0.6, 1), fontsize=24)
        tmp = path.with_name("progress.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
