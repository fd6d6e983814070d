"""The SAM-2 refresh schedule as fractions of the run, so any training length gets refreshes (or is refused)."""

from __future__ import annotations

import math
from dataclasses import dataclass


def _epochs(fraction: float, num_epochs: int, minimum: int) -> int:
    """round(fraction * num_epochs), halves up (Python's round() would round 2.5 down), at least ``minimum``."""
    return max(minimum, int(math.floor(fraction * num_epochs + 0.5)))


@dataclass(frozen=True)
class SAMSchedule:
    """The refresh schedule of one run, in epochs (0-based, as nnU-Net counts them)."""

    num_epochs: int
    warmup: int  # epochs trained before the first refresh
    every: int  # epochs between refreshes
    rampup: int  # epochs over which the SAM weight reaches lambda_sam after the warm-up
    refresh_epochs: tuple[int, ...]  # a refresh runs at the END of each of these epochs

    @classmethod
    def from_fractions(cls, num_epochs: int, warmup_fraction: float, every_fraction: float,
                       rampup_fraction: float) -> SAMSchedule:
        """Refresh at the end of epoch e for e + 1 = warm-up + j * every (j = 0, 1, ...) and e < num_epochs - 1: a
        refresh after the last epoch would train nothing."""
        warmup = _epochs(warmup_fraction, num_epochs, 1)
        every = _epochs(every_fraction, num_epochs, 1)
        rampup = _epochs(rampup_fraction, num_epochs, 0)
        return cls(num_epochs, warmup, every, rampup, tuple(range(warmup - 1, num_epochs - 1, every)))

    def describe(self, lambda_sam: float) -> str:
        epochs = list(self.refresh_epochs)
        shown = ", ".join(map(str, epochs)) if len(epochs) <= 40 else \
            ", ".join(map(str, epochs[:20])) + ", ..., " + ", ".join(map(str, epochs[-5:]))
        return (f"SAM-2 schedule for {self.num_epochs} epochs: {len(epochs)} refresh(es), at the end of epoch(s) "
                f"[{shown}] (warm-up {self.warmup} epochs, then every {self.every}); SAM loss weight ramps linearly "
                f"to {lambda_sam} over {self.rampup} epochs from epoch {self.warmup}")
