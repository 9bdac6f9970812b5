"""The DeepSpeed configuration of an experiment: its JSON file, the overrides, and what the trainer owns.

A pure function of the experiment, so ``--print-config``/``--dry-run`` show exactly what the trainer
will hand to ``deepspeed.initialize`` without building a model or a process group.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config_checks import apply_overrides
from .config import ExperimentConfig, deepspeed_file

__all__ = ["deepspeed_config"]


def deepspeed_config(config: ExperimentConfig) -> dict[str, Any]:
    """The JSON file named by ``config.deepspeed`` with ``deepspeed_overrides`` merged on top, the batch
    keys set from the data and train sections, and monitors writing under the run directory."""
    ds = apply_overrides(json.loads(deepspeed_file(config.deepspeed).read_text()), config.deepspeed_overrides)
    ds["train_micro_batch_size_per_gpu"] = config.data.batch_size_per_rank
    ds["gradient_accumulation_steps"] = config.train.gradient_accumulation_steps
    ds.pop("train_batch_size", None)
    for monitor in ("tensorboard", "csv_monitor"):
        if ds.get(monitor, {}).get("enabled"):
            ds[monitor] = {**ds[monitor], "output_path": str(Path(config.output_dir) / "monitor"), "job_name": "train"}
    return ds

