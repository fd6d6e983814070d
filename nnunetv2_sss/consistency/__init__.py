"""Pseudo-labels, confidence masks, unsupervised losses, EMA teacher and DFE."""
