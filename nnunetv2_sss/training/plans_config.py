"""Add a smaller configuration to a dataset's plans, with nnU-Net's ``inherits_from``.

nnU-Net plans for a GPU; on a CPU a smaller network (fewer stages, fewer features) with a larger batch makes
experiments possible with stock commands (``nnUNetv2_train D 2d_small 0``). Only what differs is stored; the
network architecture is written out in full because nnU-Net merges inherited configurations shallowly.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import numpy as np
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_sss.files import atomic_write_text


def add_configuration(dataset: str | int, name: str, parent: str = "2d", plans_identifier: str = "nnUNetPlans",
                      n_stages: int | None = None, base_features: int | None = None, max_features: int | None = None,
                      batch_size: int | None = None, spacing: list[float] | None = None,
                      patch_size: list[int] | None = None, overwrite: bool = False) -> tuple[Path, bool]:
    """Add configuration ``name`` to the plans; return (plans file, whether it needs its own preprocessing).

    Changing spacing or patch size means new preprocessed data (a new ``data_identifier``, run
    ``nnUNetv2_preprocess -d D -c NAME``); otherwise the parent's preprocessed data is reused.
    """
    plans_file = Path(nnUNet_preprocessed.require()) / maybe_convert_to_dataset_name(dataset) / \
        f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found: run nnUNetv2_plan_and_preprocess -d {dataset} first.")
    plans = json.loads(plans_file.read_text())
    if name in plans["configurations"] and not overwrite:
        raise ValueError(f"Configuration '{name}' already exists in {plans_file}; pass --overwrite to replace it.")
    if parent not in plans["configurations"]:
        raise ValueError(f"Parent configuration '{parent}' is not in {plans_file} "
                         f"(available: {', '.join(plans['configurations'])}).")
    parent_cm = PlansManager(plans).get_configuration(parent)
    arch = deepcopy(parent_cm.configuration["architecture"])
    kw = arch["arch_kwargs"]
    stages = n_stages or kw["n_stages"]
    if not 2 <= stages <= kw["n_stages"]:
        raise ValueError(f"n_stages must be between 2 and the parent's {kw['n_stages']}, got {stages}")
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if key in kw:
            kw[key] = kw[key][:stages]
    if "n_conv_per_stage_decoder" in kw:
        kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][:stages - 1]
    kw["n_stages"] = stages
    if base_features is not None or max_features is not None:
        base = base_features or kw["features_per_stage"][0]
        cap = max_features or max(kw["features_per_stage"])
        kw["features_per_stage"] = [min(base * 2 ** i, cap) for i in range(stages)]

    config: dict = {"inherits_from": parent, "architecture": arch}
    if batch_size is not None:
        config["batch_size"] = batch_size
    own_data = spacing is not None or patch_size is not None
    if spacing is not None:
        if len(spacing) != len(parent_cm.spacing):
            raise ValueError(f"spacing needs {len(parent_cm.spacing)} values for '{parent}', got {spacing}")
        config["spacing"] = [float(s) for s in spacing]
        config["data_identifier"] = f"{plans_identifier}_{name}"
        if patch_size is None:  # keep the parent's field of view in physical units
            patch_size = [int(p * s / t) for p, s, t in zip(parent_cm.patch_size, parent_cm.spacing, spacing)]
    if patch_size is not None:
        if len(patch_size) != len(parent_cm.patch_size):
            raise ValueError(f"patch size needs {len(parent_cm.patch_size)} values, got {patch_size}")
        divisor = np.prod(np.array(kw["strides"]), axis=0)
        patch_size = [max(int(d), int(round(p / d)) * int(d)) for p, d in zip(patch_size, divisor)]
        config["patch_size"] = patch_size
        config["data_identifier"] = f"{plans_identifier}_{name}"
        if spacing is None:
            config["spacing"] = list(parent_cm.spacing)
    plans["configurations"][name] = config
    PlansManager(plans).get_configuration(name)  # validates the inheritance chain before writing
    atomic_write_text(plans_file, json.dumps(plans, indent=4))
    return plans_file, own_data
