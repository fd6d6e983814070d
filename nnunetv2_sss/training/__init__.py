"""nnU-Net trainer classes (and their short variants) of this package."""
