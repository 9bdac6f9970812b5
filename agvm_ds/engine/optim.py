"""The base optimizer AGVM wraps, built over per-module param groups."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..agvm import AGVM, AGVMConfig, module_param_groups
from .config import OptimizerConfig

__all__ = ["build_optimizer", "describe"]


def build_optimizer(
    model: nn.Module, modules: Mapping[str, Sequence[str]], config: OptimizerConfig, lr: float, agvm: AGVMConfig
) -> AGVM:
    """SGD with momentum, AdamW, or LAMB (timm's, the large-batch baseline of the paper) inside AGVM.

    Norms and biases get no weight decay. With ``agvm.enabled`` false the wrapper passes every step
    through unchanged, so a baseline run takes exactly the same code path.
    """
    groups = module_param_groups(model, modules, weight_decay=config.weight_decay, lr=lr)
    base: torch.optim.Optimizer
    if config.name == "sgd":
        base = torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    elif config.name == "adamw":
        base = torch.optim.AdamW(groups, lr=lr, betas=tuple(config.betas), eps=config.eps)
    else:
        from timm.optim import Lamb

        base = Lamb(groups, lr=lr, betas=tuple(config.betas), eps=config.eps)
    return AGVM(base, agvm)


def describe(optimizer: AGVM) -> dict[str, Any]:
    """Per-module parameter counts of the optimizer's groups, for the start-up log."""
    counts: dict[str, int] = {}
    for group in optimizer.param_groups:
        counts[group["agvm_module"]] = counts.get(group["agvm_module"], 0) + sum(p.numel() for p in group["params"])
    return counts
