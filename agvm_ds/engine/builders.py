"""The pieces of a training run, each built from an experiment in one place.

Why: the trainer, the throughput benchmark and the large-batch tools must train the same network
with the same optimizer and the same DeepSpeed engine, so that what they measure is what a run
does. ``Trainer.__init__`` composes these; the tools call the ones they need.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..agvm import AGVM, initialize
from ..detection import build_detector
from .config import ExperimentConfig
from .model_spec import experiment_spec
from .step import NonFiniteGuard, StepRunner

__all__ = ["build_model", "build_step_runner"]


def build_model(config: ExperimentConfig, num_categories: int, num_stuff: int = 0) -> nn.Module:
    """The model of ``config`` for a data set of ``num_categories`` (and ``num_stuff`` stuff categories,
    panoptic), with the trainer's resize rule:
    a recipe that resizes (``test_resize`` derived from it) sizes training images in the data pipeline,
    so the model resizes only when the recipe does not. Seed torch's RNG first for reproducible weights."""
    spec = experiment_spec(config, num_categories, num_stuff)
    return build_detector(spec, resize_in_model=config.data.test_resize() is None)


def build_step_runner(model: nn.Module, optimizer: AGVM, ds_config: dict[str, Any],
                      schedule: Callable[[int], float], max_consecutive_skips: Optional[int],
                      report: Optional[Callable[[str], None]] = None) -> StepRunner:
    """The DeepSpeed engine (with AGVM attached) around ``model``, and the :class:`StepRunner` that trains it.

    ``schedule`` multiplies the learning rate at each step; ``max_consecutive_skips`` None trains on
    non-finite losses, an int skips them (``train.skip_nonfinite_loss``). The guard is built before
    the engine because its gradient hooks must run before AGVM's.
    """
    guard = None if max_consecutive_skips is None else NonFiniteGuard(model, max_consecutive_skips)
    engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=ds_config,
                                 lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if engine.torch_autocast_enabled():
        # autocast caches the low-precision copy of every weight until the forward ends: under
        # ZeRO-3 that is a copy of the whole gathered model per rank (2 GB for the 1B SwinV2),
        # and with activation checkpointing it keeps what checkpointing discards
        torch.set_autocast_cache_enabled(False)
    runner = StepRunner(engine, guard, report)
    _cast_float_buffers(engine.module, runner.dtype)
    return runner


def _cast_float_buffers(module: nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm statistics and the
    constants of torchvision's FrozenBatchNorm2d must match the activations' dtype."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)
