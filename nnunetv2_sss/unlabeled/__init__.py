"""Unlabeled images as first-class nnU-Net data: raw discovery, preprocessing with the dataset's plans, loading."""
