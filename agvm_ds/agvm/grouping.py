"""Optimizer param groups tagged with the AGVM module they belong to.

A dense predictor is split into modules (backbone, fpn, rpn, roi heads, ...) by submodule name
prefix. Each module may own several param groups (e.g. with and without weight decay); all of them
share the module's factor. Every trainable parameter must belong to exactly one module: the
official code silently never optimizes a parameter outside its listed components.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

__all__ = ["MODULE_KEY", "assign_modules", "module_param_groups"]

MODULE_KEY = "agvm_module"
"""The param-group key naming a group's AGVM module. DeepSpeed keeps extra group keys."""


def _matches(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def assign_modules(model: nn.Module, modules: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Maps each AGVM module to the names of its trainable parameters.

    Args:
        modules: module name -> submodule prefixes, e.g. ``{"backbone": ["backbone.body"],
            "fpn": ["backbone.fpn"], "rpn": ["rpn"]}``. The longest matching prefix wins, so
            ``{"backbone": ["backbone"], "fpn": ["backbone.fpn"]}`` is unambiguous.

    Raises:
        ValueError: naming the parameter matched by no module, or by two modules at the same
            prefix length, or naming a module that matched no parameter.
    """
    if not modules:
        raise ValueError("AGVM: no modules given; expected a mapping of module name -> submodule prefixes")
    assigned: dict[str, list[str]] = {module: [] for module in modules}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        best: list[tuple[int, str]] = []
        for module, prefixes in modules.items():
            if isinstance(prefixes, str):
                raise ValueError(f"AGVM: prefixes of module {module!r} must be a list, got the string {prefixes!r}")
            for prefix in prefixes:
                if _matches(name, prefix):
                    best.append((len(prefix), module))
        if not best:
            raise ValueError(
                f"AGVM: trainable parameter {name!r} belongs to no module; modules and prefixes are "
                f"{ {m: list(p) for m, p in modules.items()} }"
            )
        longest = max(length for length, _ in best)
        owners = sorted({module for length, module in best if length == longest})
        if len(owners) > 1:
            raise ValueError(f"AGVM: trainable parameter {name!r} matches several modules {owners}")
        assigned[owners[0]].append(name)
    empty = [module for module, names in assigned.items() if not names]
    if empty:
        raise ValueError(f"AGVM: module(s) {empty} match no trainable parameter of the model")
    return assigned


def module_param_groups(
    model: nn.Module,
    modules: Mapping[str, Sequence[str]],
    weight_decay: float = 0.0,
    no_decay_1d: bool = True,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Builds optimizer param groups, one or two per AGVM module, tagged with ``MODULE_KEY``.

    With ``no_decay_1d`` (the usual recipe for norms and biases) a module gets a second group of its
    1-d parameters with weight decay 0. Extra ``group_options`` (e.g. ``lr``) go into every group.
    """
    params = dict(model.named_parameters())
    groups: list[dict[str, Any]] = []
    for module, names in assign_modules(model, modules).items():
        decay = [params[n] for n in names if not (no_decay_1d and params[n].ndim <= 1)]
        no_decay = [params[n] for n in names if no_decay_1d and params[n].ndim <= 1]
        for suffix, group_params, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
            if group_params:
                groups.append({"params": group_params, "weight_decay": wd, MODULE_KEY: module,
                               "name": module + suffix, **group_options})
    return groups
