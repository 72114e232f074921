"""Layout-independent train state for torch.distributed.checkpoint (DCP).

DCP stores each tensor under its fully-qualified name with its global shape; every rank writes
its shard and any later layout reads the pieces it needs. The parallel wrappers keep names
unchanged (FSDP2 and TP hold DTensors; pipeline stages delete layers but keep names), with one
exception handled here: expert-parallel weights are rank-local slices (or FSDP2 shards of them
over edp), and so is their optimizer state. `train_state_dict` presents both as DTensors of the
global stacked tensors (expert.py `global_view`); `load_train_state_dict` turns them back.

    sd = train_state_dict(model, optimizer); dcp.save(sd, checkpoint_id=DIR)
    sd = train_state_dict(model, optimizer); dcp.load(sd, checkpoint_id=DIR)
    load_train_state_dict(model, optimizer, sd)
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .expert import global_view, local_view


def _expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{parameter name: its expert module} for the expert-parallel parameters of `model`."""
    out = {}
    for mod_name, module in model.named_modules():
        if getattr(module, "_llmc_ep_mesh", None) is None:
            continue
        for p_name, _ in module.named_parameters(recurse=False):
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    return out


def _plain(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def train_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model": ..., "optimizer": ...} for dcp.save / dcp.load, the same under every layout."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    for name, experts in _expert_modules(_plain(model)).items():
        for key, value in optim_sd.get("state", {}).get(name, {}).items():
            if key != "step" and torch.is_tensor(value):
                optim_sd["state"][name][key] = global_view(experts, value)
    return {"model": model_sd, "optimizer": optim_sd}


def load_train_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Put a state (filled by dcp.load from train_state_dict's template) into model and optimizer."""
    optim_sd = state["optimizer"]
    params = dict(_plain(model).named_parameters())
    for name, experts in _expert_modules(_plain(model)).items():
        for key, value in optim_sd.get("state", {}).get(name, {}).items():
            if key != "step" and torch.is_tensor(value):
                optim_sd["state"][name][key] = local_view(experts, value, params[name])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_sd)


def save_train_state(path, model: nn.Module, optimizer) -> None:
    """dcp.save of model and optimizer (every rank calls it)."""
    dcp.save(train_state_dict(model, optimizer), checkpoint_id=str(path))


def load_train_state(path, model: nn.Module, optimizer) -> None:
    """dcp.load into model and optimizer, whatever layout wrote the checkpoint."""
    state = train_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    load_train_state_dict(model, optimizer, state)
