"""Warm start: begin a run from the user's supervised nnU-Net model of the same dataset, heads included.

Why: a semi-supervised run from scratch has to converge twice (first on the labeled cases, only then are its
pseudo-labels worth training on), and every nnU-Net user already has a supervised model before trying anything
else. nnU-Net's ``-pretrained_weights`` is made for transfer across label sets: it drops every ``.seg_layers.`` key
and loads after ``initialize()``, so the heads stay random and anything built from the network in ``initialize()``
(the EMA teacher) starts from random weights. Here the labels are the same, so the whole network is loaded,
inside ``initialize()``, before the teacher and DFE are made from it.

Set ``nnUNet_sss_init_checkpoint=/path/to/fold_X/checkpoint_final.pth`` (or the trainer attribute
``init_checkpoint``). A checkpoint of another dataset, label set, configuration, fold or network is refused at the
start with the reason. A warm-started run uses ``warm_start_initial_lr`` and ``warm_start_num_epochs`` (trainer
attributes) instead of nnU-Net's 0.01 and 1000 epochs: it fine-tunes a converged model rather than training one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn
from torch._dynamo import OptimizedModule

INIT_CHECKPOINT_ENV = "nnUNet_sss_init_checkpoint"


class WarmStartError(ValueError):
    """The checkpoint cannot start this run; the message says which file, what differs and what to do."""


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain network under DDP (``.module``) and torch.compile (``._orig_mod``)."""
    mod = network.module if hasattr(network, "module") and not hasattr(network, "encoder") else network
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod


def init_checkpoint_path(attribute: str | None) -> Path | None:
    """The warm-start checkpoint from ``nnUNet_sss_init_checkpoint`` (wins) or the trainer attribute, or None."""
    value = os.environ.get(INIT_CHECKPOINT_ENV) or attribute
    return Path(value).expanduser() if value else None


def read_checkpoint(path: Path) -> dict:
    """The checkpoint as a dict, or WarmStartError that says what is wrong with the file."""
    if path.is_dir():
        raise WarmStartError(f"{INIT_CHECKPOINT_ENV}={path} is a directory: give the checkpoint file inside it "
                             f"(e.g. {path / 'checkpoint_final.pth'}).")
    if not path.is_file():
        raise WarmStartError(f"{INIT_CHECKPOINT_ENV}={path}: no such file. Train the supervised model first "
                             f"(nnUNetv2_train DATASET CONFIG FOLD) and point the variable at its "
                             f"checkpoint_final.pth.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated files raise EOFError, RuntimeError, UnpicklingError, ...
        raise WarmStartError(f"{INIT_CHECKPOINT_ENV}={path} cannot be read ({type(e).__name__}: {str(e)[:160]}); "
                             f"is the file complete?") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint or "init_args" not in checkpoint:
        raise WarmStartError(f"{INIT_CHECKPOINT_ENV}={path} is not an nnU-Net training checkpoint (no "
                             f"'network_weights'/'init_args'): use a checkpoint_*.pth written by nnUNetv2_train.")
    return checkpoint


def mismatches(checkpoint: dict, plans: dict, configuration: str, fold: int | str, dataset_json: dict) -> list[str]:
    """What makes a checkpoint unfit to start this run (empty when it fits): dataset, labels, configuration, fold,
    network architecture."""
    args = checkpoint["init_args"]
    c_plans, c_conf, c_ds = args["plans"], args["configuration"], args["dataset_json"]
    out = []
    if c_plans.get("dataset_name") != plans.get("dataset_name"):
        out.append(f"dataset: the checkpoint is of {c_plans.get('dataset_name')}, this run of "
                   f"{plans.get('dataset_name')}")
    if c_ds.get("labels") != dataset_json.get("labels"):
        out.append(f"labels: the checkpoint's {c_ds.get('labels')} differ from this dataset's "
                   f"{dataset_json.get('labels')}")
    if c_conf != configuration:
        out.append(f"configuration: the checkpoint was trained with '{c_conf}', this run uses '{configuration}'")
    if str(args.get("fold")) != str(fold) and str(fold) != "all":
        out.append(f"fold: the checkpoint was trained on fold {args.get('fold')}, this run is fold {fold}; its "
                   f"validation cases were that model's training cases, so its validation Dice would be inflated")
    if not out:
        mine = PlansManager(plans).get_configuration(configuration)
        theirs = PlansManager(c_plans).get_configuration(c_conf)
        if (mine.network_arch_class_name, mine.network_arch_init_kwargs) != \
                (theirs.network_arch_class_name, theirs.network_arch_init_kwargs):
            out.append(f"network: the checkpoint's {theirs.network_arch_class_name} "
                       f"{theirs.network_arch_init_kwargs} differs from this run's {mine.network_arch_class_name} "
                       f"{mine.network_arch_init_kwargs}")
    return out


def plain_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict keys without DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for k, v in weights.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_whole_network(network: nn.Module, checkpoint: dict, path: Path) -> None:
    """Every weight, segmentation heads included; a key or shape mismatch is refused with the first few named."""
    net = unwrap_network(network)
    weights = plain_state_dict(checkpoint["network_weights"])
    own = net.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and tuple(weights[k].shape) != tuple(v.shape)]
    if missing or extra or shapes:
        raise WarmStartError(
            f"{INIT_CHECKPOINT_ENV}={path}: network: the checkpoint's weights do not fit this run's network "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, shape {shapes[:3]}). Warm-start only from a supervised "
            f"model of the same dataset, plans and configuration.")
    net.load_state_dict(weights)


def warm_start(trainer, path: Path) -> None:
    """Check the checkpoint against the trainer's dataset, labels, configuration, fold and network, then load it
    into ``trainer.network`` (called inside ``initialize()``, before anything is built from the network)."""
    checkpoint = read_checkpoint(path)
    problems = mismatches(checkpoint, trainer.plans_manager.plans, trainer.configuration_name, trainer.fold,
                          trainer.dataset_json)
    if problems:
        raise WarmStartError(f"{INIT_CHECKPOINT_ENV}={path} cannot start this run: " + "; ".join(problems)
                             + ". Use a supervised checkpoint of the same dataset, configuration and fold, or unset "
                               f"{INIT_CHECKPOINT_ENV} to train from scratch.")
    load_whole_network(trainer.network, checkpoint, path)
    trainer.print_to_log_file(
        f"warm start from {path} ({checkpoint.get('trainer_name')}, {checkpoint.get('current_epoch')} epochs): whole "
        f"network loaded, segmentation heads included; initial lr {trainer.initial_lr}, {trainer.num_epochs} epochs",
        also_print_to_console=True)
