"""nnunetv2-sss: semi-supervised segmentation inside nnU-Net v2 (weak-to-strong consistency, DFE, SAM-2 via PCSW)."""

__version__ = "0.1.0"
