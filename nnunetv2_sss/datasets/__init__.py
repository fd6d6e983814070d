"""Dataset tools: the embedded synthetic dataset, label budgets, the ACDC converter."""
