"""Trainer runs on spawned CPU ranks for tests/test_train_system.py (importable by the children)."""
from __future__ import annotations

import math

import torch

from agvm_ds.engine import load_config
from agvm_ds.engine.trainer import Trainer


def nan_loss_run(rank: int, world: int, tmp: str, overrides: list[str]) -> dict:
    """Five optimizer steps where rank 1's third forward returns a NaN loss."""
    config = load_config("configs/synthetic_tiny.yaml", [*overrides, "train.max_iters=5", "train.eval_interval=100"])
    trainer = Trainer(config)
    module = trainer.engine.module
    forward, calls = module.forward, [0]

    def forward_with_nan(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls[0] += 1
        if module.training and rank == 1 and calls[0] == 3:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    module.forward = forward_with_nan
    trainer.fit()
    stats = trainer.optimizer.statistics()
    return {
        "skipped": trainer.skipped_nonfinite,
        "iterations": trainer.engine.global_steps,
        "agvm_updates": trainer.optimizer.modulator.num_updates,
        "params_finite": all(bool(torch.isfinite(p).all()) for p in module.parameters()),
        "factors_finite": all(math.isfinite(v["factor"]) and math.isfinite(v["phi"]) for v in stats.values()),
    }
