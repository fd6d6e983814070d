"""What the semi-supervised trainers log per epoch, and progress_semi.png beside nnU-Net's progress.png: supervised
loss, unsupervised terms, fractions and similarity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402
from nnunetv2.utilities.collate_outputs import collate_outputs  # noqa: E402
from torch import distributed as dist  # noqa: E402

from nnunetv2_sss.files import save_figure  # noqa: E402

SEMI_PROGRESS_PNG = "progress_semi.png"  # written next to nnU-Net's progress.png


class SSSLocalLogger(LocalLogger):
    """nnU-Net's local logger that knows the SSS keys and draws them in a figure beside nnU-Net's own."""

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

    def _panels(self) -> list[tuple[str, list[str]]]:
        """Below nnU-Net's figure: the supervised loss alone (nnU-Net's own loss, comparable with a stock run's
        train loss), each unsupervised term, and the fractions (confident pixels overall and per class, DFE
        similarity of the views, SAM agreement)."""
        sup = [k for k in self.loss_keys if k.endswith("_sup")]
        unsup = [k for k in self.loss_keys if k not in sup]
        return [("supervised loss (nnU-Net's)", sup), ("unsupervised terms", unsup),
                ("fraction / similarity", list(self.fraction_keys))]

    def plot_progress_png(self, output_folder: str) -> None:
        """nnU-Net's progress.png as it is, and our panels in progress_semi.png beside it.

        A figure of their own: composing them under nnU-Net's 3000 x 5400 pixel figure (read back, redrawn, saved
        larger) cost five to seven times nnU-Net's own plot at every epoch end (scripts/bench_progress_plot.py)."""
        super().plot_progress_png(output_folder)
        epoch = min(len(v) for v in self.my_fantastic_logging.values()) - 1
        panels = [(title, keys) for title, keys in self._panels() if keys]
        if epoch < 0 or not panels:
            return
        x = list(range(epoch + 1))
        # nnU-Net's plot scales seaborn's fonts by 2.5 for its huge figure; this one is small: plain sizes
        with plt.rc_context({"font.size": 10, "axes.labelsize": 10, "axes.titlesize": 11, "xtick.labelsize": 9,
                             "ytick.labelsize": 9, "legend.fontsize": 8}):
            fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), dpi=100, squeeze=False)
            for ax, (title, keys) in zip(axes[:, 0], panels):
                lowest = np.inf
                for k in keys:
                    vals = np.asarray(self.my_fantastic_logging[k][: epoch + 1], dtype=float)
                    ax.plot(x, vals, ls="-", label=k.removeprefix("sss_"), linewidth=2)
                    if np.isfinite(vals).any():
                        lowest = min(lowest, float(np.nanmin(vals)))
                if title.startswith("fraction"):  # fractions in [0, 1]; the DFE cosine similarity may go negative
                    ax.set_ylim(min(0.0, lowest if np.isfinite(lowest) else 0.0) - 0.05, 1.05)
                ax.set_title(title)
                ax.set_xlabel("epoch")
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
            fig.tight_layout()
            save_figure(fig, Path(output_folder) / SEMI_PROGRESS_PNG)
            plt.close(fig)


LOSS_KEYS = ("sss_loss_sup", "sss_loss_s1", "sss_loss_s2", "sss_loss_fp", "sss_loss_dfe", "sss_loss_sam")
FRACTION_KEYS = ("sss_confident_fraction", "sss_dfe_similarity", "sss_sam_agreement")


def class_fraction_keys(num_classes: int) -> tuple[str, ...]:
    """One confident-fraction key per class (background included): the share of the pixels pseudo-labelled as that
    class whose confidence reaches the threshold."""
    return tuple(f"sss_confident_fraction_c{c}" for c in range(num_classes))


class SemiSupervisedLogging:
    """Per-epoch means of what every step returns, through nnU-Net's logger (and so onto progress_semi.png)."""

    def logged_step_keys(self) -> tuple[str, ...]:
        """What every step returns for the epoch's log (the SAM agreement is logged per refresh instead)."""
        return tuple(k for k in LOSS_KEYS + FRACTION_KEYS + self.class_fraction_keys if k != "sss_sam_agreement")

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        collated = collate_outputs(train_outputs)
        for k in self.logged_step_keys():
            vals = np.asarray(collated[k], dtype=np.float64)
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, vals)
                vals = np.concatenate([np.ravel(g) for g in gathered])
            value = float(np.nanmean(vals)) if np.any(np.isfinite(vals)) else math.nan
            self.logger.log(k, value, self.current_epoch)
        self.logger.log("sss_sam_agreement", self.sam_agreement_this_epoch(), self.current_epoch)
        self.print_to_log_file("unsupervised: " + ", ".join(
            f"{k.removeprefix('sss_')} {self.logger.get_value(k, step=-1):.4f}" for k in LOSS_KEYS + FRACTION_KEYS))

    def sam_agreement_this_epoch(self) -> float:
        """SAM-student Dice of the latest refresh (NaN without SAM)."""
        return math.nan

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        return self.semi_state.state_dict()

    def load_extra_checkpoint_state(self, state: dict) -> None:
        self.semi_state.load_state_dict(state)
