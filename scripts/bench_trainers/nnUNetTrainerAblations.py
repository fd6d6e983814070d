"""Ablation trainers of the benchmarks (one attribute changed each): benchmark code, not part of the package.

Found by nnU-Net only when this folder is on ``nnUNet_extTrainer`` (``scripts/bench_lib.py`` adds it for the
benchmark commands). nnU-Net imports this module as a top-level module: absolute imports only.
"""

from nnunetv2_sss.training.semi_supervised import nnUNetTrainerSSS_noSAM, nnUNetTrainerUniMatch


class nnUNetTrainerUniMatch_ratio025(nnUNetTrainerUniMatch):
    """Unlabeled batch a quarter of the labeled batch (the earlier default)."""

    unlabeled_batch_ratio = 0.25


class nnUNetTrainerUniMatch_mixdraw(nnUNetTrainerUniMatch):
    """CutMix partners from a separate loader draw (UniMatch's reference code) instead of the batch itself."""

    mix_partners = "draw"


class nnUNetTrainerUniMatch_cutmix1(nnUNetTrainerUniMatch):
    cutmix_p = 1.0


class nnUNetTrainerUniMatch_rampup(nnUNetTrainerUniMatch):
    """Unsupervised weights ramped up (sigmoid) over the first fifth of training."""

    unsup_rampup_fraction = 0.2


class nnUNetTrainerUniMatch_thr090(nnUNetTrainerUniMatch):
    confidence_threshold = 0.9


class nnUNetTrainerSSS_noSAM_dfe2(nnUNetTrainerSSS_noSAM):
    """DFE on the two deepest encoder scales only."""

    dfe_num_scales = 2


class nnUNetTrainerSSS_noSAM_ratio025(nnUNetTrainerSSS_noSAM):
    """SSS_noSAM with an unlabeled batch a quarter of the labeled: about a third of the cost per iteration on a CPU."""

    unlabeled_batch_ratio = 0.25


class nnUNetTrainerSSS_noSAM_adaptive(nnUNetTrainerSSS_noSAM):
    """SSS_noSAM with class-adaptive confidence thresholds (consistency/losses.py: ClassAdaptiveThreshold)."""

    class_adaptive_threshold = True


class nnUNetTrainerUniMatch_adaptive(nnUNetTrainerUniMatch):
    class_adaptive_threshold = True


class nnUNetTrainerSSS_noSAM_mirrorPL(nnUNetTrainerSSS_noSAM):
    """SSS_noSAM with pseudo-labels from the weak prediction averaged over nnU-Net's mirror axes: the arm of round 5
    that made them the default; now the same as ``nnUNetTrainerSSS_noSAM``, kept so its commands still run."""

    pseudo_label_mirroring = True


class nnUNetTrainerSSS_noSAM_noMirrorPL(nnUNetTrainerSSS_noSAM):
    """SSS_noSAM with pseudo-labels from the weak view's own prediction (the default before round 5)."""

    pseudo_label_mirroring = False
