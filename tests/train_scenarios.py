"""Trainer runs on spawned CPU ranks for tests/engine/test_train_system.py (importable by the children)."""
from __future__ import annotations

import math

import torch

from agvm_ds.engine import load_config
from agvm_ds.engine.buffers import running_stats
from agvm_ds.engine.trainer import Trainer, TrainingDiverged


def _poison_forward(trainer: Trainer, poisoned) -> None:
    """Makes the training forward pass see NaN images whenever ``poisoned(call_number)`` is true."""
    module = trainer.engine.module
    forward, calls = module.forward, [0]

    def forward_with_nan(images, *args, **kwargs):
        if module.training:
            calls[0] += 1
            if poisoned(calls[0]):
                images = [image * float("nan") for image in images]
        return forward(images, *args, **kwargs)

    module.forward = forward_with_nan


def nan_batch_run(rank: int, world: int, tmp: str, overrides: list[str]) -> dict:
    """Five optimizer steps where rank 1's third training forward sees NaN images."""
    config = load_config("configs/synthetic_tiny.yaml", [*overrides, "train.max_iters=5", "train.eval_interval=100"])
    trainer = Trainer(config)
    stats_before_fit = [b.clone() for b in running_stats(trainer.engine.module)]
    _poison_forward(trainer, lambda call: rank == 1 and call == 3)
    trainer.fit()
    stats = trainer.optimizer.statistics()
    buffers = running_stats(trainer.engine.module)
    return {
        "skipped": trainer.steps.skipped_nonfinite,
        "iterations": trainer.engine.global_steps,
        "agvm_updates": trainer.optimizer.modulator.num_updates,
        "params_finite": all(bool(torch.isfinite(p).all()) for p in trainer.engine.module.parameters()),
        "buffers_finite": all(bool(torch.isfinite(b.float()).all()) for b in buffers),
        "buffers_changed": any(not torch.equal(a, b) for a, b in zip(stats_before_fit, buffers)),
        "factors_finite": all(math.isfinite(v["factor"]) and math.isfinite(v["phi"]) for v in stats.values()),
    }


def diverging_run(rank: int, world: int, tmp: str, overrides: list[str]) -> str:
    """Every forward from the fourth on sees NaN images: the run must stop, not skip forever."""
    config = load_config("configs/synthetic_tiny.yaml", [*overrides, "train.max_iters=50", "train.checkpoint_iters=1",
                                                         "train.max_consecutive_skips=3"])
    trainer = Trainer(config)
    _poison_forward(trainer, lambda call: call >= 4)
    try:
        trainer.fit()
    except TrainingDiverged as error:
        return f"{trainer.engine.global_steps}|{error}"
    return "not stopped"


def running_stats_after_training(rank: int, world: int, tmp: str, overrides: list[str]) -> list[torch.Tensor]:
    config = load_config("configs/synthetic_tiny.yaml", [*overrides, "train.max_iters=3", "train.eval_interval=100"])
    trainer = Trainer(config)
    trainer.fit()
    return [b.clone() for b in running_stats(trainer.engine.module)]


def losses_at_two_log_intervals(rank: int, world: int, tmp: str, overrides: list[str]) -> list[list[dict]]:
    """The same four steps logged every step and every second step (two trainers, one process)."""
    import json
    from pathlib import Path

    records = []
    for interval in (1, 2):
        run = Path(tmp) / f"log_every_{interval}"
        config = load_config("configs/synthetic_tiny.yaml",
                             [*overrides, f"output_dir={run}", "train.max_iters=4", f"train.log_interval={interval}",
                              "train.eval_interval=100"])
        Trainer(config).fit()
        records.append([json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()])
    return records
