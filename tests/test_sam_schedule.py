"""The SAM-2 refresh schedule as fractions of num_epochs: never silently off, for any training length.

Pure schedule arithmetic on the real trainer classes (no data, no model): the epochs a trainer prints are the epochs
``sam_refresh_due`` fires on, for every num_epochs from 2 to 1000. tests/test_sam_training.py runs real nnU-Net
training and checks that the refreshes happen at the printed epochs (2 and 5 epochs) and that a run without a
possible refresh is refused before anything heavy.
"""

from __future__ import annotations

import re

import pytest

from nnunetv2_sss.training.sam_schedule import SAMSchedule
from nnunetv2_sss.training.sam_trainers import nnUNetTrainerSSS
from nnunetv2_sss.training.semisam import nnUNetTrainerSemiSAM
from nnunetv2_sss.training.variants import nnUNetTrainerSemiSAM_5epochs, nnUNetTrainerSSS_smoke


def _bare(cls: type, num_epochs: int):
    """An instance of the real trainer class with only what the schedule reads (no plans, no network)."""
    t = cls.__new__(cls)
    t.num_epochs, t.sam_active = num_epochs, True
    return t


@pytest.mark.parametrize("cls", [nnUNetTrainerSSS, nnUNetTrainerSemiSAM])
def test_every_run_of_two_or_more_epochs_refreshes_at_the_printed_epochs(cls: type) -> None:
    for n in [*range(2, 120), 250, 500, 999, 1000]:
        t = _bare(cls, n)
        s = t.sam_schedule()
        due = [e for e in range(n) if t.sam_refresh_due(e)]
        assert due == list(s.refresh_epochs) and due, n
        printed = re.search(r"at the end of epoch\(s\) \[([\d, ]*)\]", s.describe(t.lambda_sam)).group(1)
        if len(due) <= 40:
            assert [int(e) for e in printed.split(", ")] == due
        assert due[0] == s.warmup - 1 and due[-1] < n - 1  # never after the last epoch: nothing would train on it
        assert all(b - a == s.every for a, b in zip(due, due[1:]))
        assert n - 1 - due[-1] <= s.every  # refreshes continue to the end of the run
        # SAM-2's warm-up counts from the end of the supervised warm-up (0.2 of a run from scratch)
        assert s.warmup == max(1, int((0.1 + 0.2) * n + 0.5)) and s.every == max(1, int(0.05 * n + 0.5))


def test_default_schedule_for_nnunet_length_and_for_a_30_epoch_budget() -> None:
    warm = _bare(nnUNetTrainerSSS, 1000)
    warm.init_checkpoint_file = "supervised.pth"  # warm-started: no supervised warm-up inside the run
    s = warm.sam_schedule()
    assert (s.warmup, s.every, s.rampup) == (100, 50, 100)
    assert list(s.refresh_epochs) == list(range(99, 999, 50))  # the former absolute defaults, unchanged at 1000
    s = _bare(nnUNetTrainerSSS, 1000).sam_schedule()  # from scratch: first 200 epochs supervised, then SAM's 100
    assert (s.warmup, s.every, s.rampup) == (300, 50, 100) and list(s.refresh_epochs) == list(range(299, 999, 50))
    s30 = _bare(nnUNetTrainerSSS, 30).sam_schedule()
    assert (s30.warmup, s30.every, s30.rampup) == (9, 2, 3) and list(s30.refresh_epochs) == list(range(8, 29, 2))


def test_no_refresh_possible_for_one_epoch_or_a_too_long_warmup() -> None:
    assert _bare(nnUNetTrainerSSS, 1).sam_schedule().refresh_epochs == ()
    t = _bare(nnUNetTrainerSSS, 10)
    t.sam_warmup_fraction = 1.0
    assert t.sam_schedule().refresh_epochs == () and not any(t.sam_refresh_due(e) for e in range(10))


def test_short_variants_and_weight_ramp() -> None:
    assert _bare(nnUNetTrainerSSS_smoke, 2).sam_schedule().refresh_epochs == (0,)
    t = _bare(nnUNetTrainerSemiSAM_5epochs, 5)
    s = t.sam_schedule()
    assert (s.warmup, s.every, s.rampup, s.refresh_epochs) == (3, 1, 2, (2, 3))  # after 1 supervised epoch
    t.sam_last_refresh_epoch, weights = 1, []
    for e in range(5):
        t.current_epoch = e
        weights.append(t.sam_loss_weight())
    assert weights == [0.0, 0.0, 0.0, 0.5 * t.lambda_sam, t.lambda_sam]
    t.sam_last_refresh_epoch = None  # no refresh in this run yet: stale maps never count
    assert t.sam_loss_weight() == 0.0


def test_rounding_is_halves_up() -> None:
    s = SAMSchedule.from_fractions(50, 0.05, 0.05, 0.05)  # 2.5 epochs each: 3, not Python's round(2.5) = 2
    assert (s.warmup, s.every, s.rampup) == (3, 3, 3)
