"""Per-case, per-class Dice / HD95 / ASD in physical units, with CSV, JSON and box plots."""
