"""Thin shims for nnU-Net's ``nnUNet_extTrainer``: they only re-export trainer classes from nnunetv2_sss.

nnU-Net imports every module in this folder as a top-level module, so nothing here may use relative imports.
"""
