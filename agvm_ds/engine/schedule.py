"""Learning-rate schedule as a multiplier of the peak rate, for ``torch.optim.lr_scheduler.LambdaLR``.

LambdaLR keeps the schedule in a pure function of the iteration, so DeepSpeed checkpoints only its
counter and a resumed run continues on the same curve; AGVM's factors multiply on top, per module.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

from .config import OptimizerConfig, ScheduleConfig

__all__ = ["lr_multiplier", "peak_lr"]


def peak_lr(config: OptimizerConfig, global_batch_size: int) -> float:
    """``config.lr`` scaled from ``base_batch_size`` to the global batch (linear or sqrt rule)."""
    ratio = global_batch_size / config.base_batch_size
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[config.lr_scaling]
    return config.lr * scale


def lr_multiplier(config: ScheduleConfig, total_iters: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at (0-based) optimizer step ``it``.

    Warm-up, as in mmcv (which the official AGVM configs use): linear ramps from ``warmup_ratio``
    to 1; exponential is ``warmup_ratio ** (1 - it / warmup_iters)``. Decay then follows over the
    whole run: ``step`` multiplies by ``gamma`` at each milestone fraction, ``cosine`` anneals to
    ``min_lr_ratio``, ``poly`` (mmseg's segmentation default) falls as ``(1 - progress) ** power`` to
    ``min_lr_ratio``.
    """
    milestones = [round(m * total_iters) for m in config.milestones]
    warmup_iters = config.warmup_iters if config.warmup != "none" else 0

    def multiplier(it: int) -> float:
        if config.decay == "step":
            value = config.gamma ** bisect.bisect_right(milestones, it)
        elif config.decay == "cosine":
            progress = min(it / max(total_iters, 1), 1.0)
            value = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        elif config.decay == "poly":
            progress = min(it / max(total_iters, 1), 1.0)
            value = config.min_lr_ratio + (1 - config.min_lr_ratio) * (1 - progress) ** config.power
        else:
            value = 1.0
        if it < warmup_iters:
            if config.warmup == "linear":
                value *= config.warmup_ratio + (1 - config.warmup_ratio) * it / warmup_iters
            else:
                value *= config.warmup_ratio ** (1 - it / warmup_iters)
        return value

    return multiplier
