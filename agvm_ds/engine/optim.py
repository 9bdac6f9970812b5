"""The base optimizer AGVM wraps, built over per-module param groups."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..agvm import AGVM, AGVMConfig, module_param_groups
from ..optim import Lamb, Lars
from .config import OptimizerConfig

__all__ = ["build_optimizer", "describe"]


def build_optimizer(
    model: nn.Module, modules: Mapping[str, Sequence[str]], config: OptimizerConfig, lr: float, agvm: AGVMConfig
) -> AGVM:
    """SGD with momentum, AdamW, LAMB (the large-batch baseline of the paper) or LARS inside AGVM.

    LAMB and LARS are ``agvm_ds.optim``'s layer-wise optimizers, whose trust ratio is per parameter
    tensor under any ZeRO stage and world size (timm's Lamb computed it per rank's flat share and clipped
    there too); ``agvm_ds.initialize`` gives them the engine's partition layout. Norms and biases get no
    weight decay, and so no trust ratio. With ``agvm.enabled`` false the wrapper passes every step
    through unchanged, so a baseline run takes exactly the same code path.
    """
    groups = module_param_groups(model, modules, weight_decay=config.weight_decay, lr=lr)
    base: torch.optim.Optimizer
    if config.name == "sgd":
        base = torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    elif config.name == "adamw":
        base = torch.optim.AdamW(groups, lr=lr, betas=tuple(config.betas), eps=config.eps)
    elif config.name == "lamb":
        base = Lamb(groups, lr=lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay,
                    bias_correction=config.bias_correction)
    elif config.name == "lars":
        base = Lars(groups, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay,
                    trust_coefficient=config.trust_coefficient, eps=config.eps)
    else:
        raise ValueError(f"optimizer.name={config.name!r}: expected one of sgd, adamw, lamb, lars")
    return AGVM(base, agvm)


def describe(optimizer: AGVM) -> dict[str, Any]:
    """Per-module parameter counts of the optimizer's groups, for the start-up log."""
    counts: dict[str, int] = {}
    for group in optimizer.param_groups:
        counts[group["agvm_module"]] = counts.get(group["agvm_module"], 0) + sum(p.numel() for p in group["params"])
    return counts
