"""What a finished (or running) training run holds: its config, its classes, and a checkpoint's
weights consolidated into one plain fp32 state dict, whatever ZeRO stage and world size wrote them.

Evaluation, prediction and export all go through :func:`trained_detector`, so they run the same
model: the torchvision detector the trainer built (its spec, with the data set's class count and the
evaluation size the recipe derived), holding the checkpoint's fp32 weights and BatchNorm statistics.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..data.semantic import ADE20K_CLASSES, read_class_names
from ..data.synthetic import CATEGORIES
from ..detection import ModelSpec
from ..detection.weights import detector_from_state_dict
from . import checkpointing
from .config import ExperimentConfig, load_config
from .loaders import split_sources
from .model_spec import experiment_spec

__all__ = ["TrainedRun", "command_parser", "consolidated_state_dict", "find_checkpoint", "run_categories",
           "trained_detector"]


@dataclass(frozen=True)
class TrainedRun:
    """A run directory's experiment, the checkpoint picked from it, and the model they define."""

    run_dir: Path
    config: ExperimentConfig
    checkpoint: checkpointing.Checkpoint
    spec: ModelSpec
    categories: tuple[dict[str, Any], ...]

    @classmethod
    def open(cls, run_dir: Union[str, Path], tag: Optional[str] = None) -> "TrainedRun":
        """Reads ``run_dir/config.json`` and finds checkpoint ``tag`` (default: the newest complete one)."""
        run_dir = Path(run_dir)
        config_file = run_dir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.json (written by agvm-train)")
        config = load_config(config_file)
        checkpoint = find_checkpoint(run_dir, tag)
        categories = tuple(run_categories(config))
        things = sum(1 for c in categories if c.get("isthing", 1))
        spec = experiment_spec(config, things, len(categories) - things)
        return cls(run_dir, config, checkpoint, spec, categories)


def find_checkpoint(run_dir: Path, tag: Optional[str] = None) -> checkpointing.Checkpoint:
    """Checkpoint ``tag`` of the run, or its newest complete one (``--resume auto``'s choice), checked complete."""
    directory = run_dir / checkpointing.CHECKPOINT_DIR
    checkpoint = checkpointing.resolve_resume(str(directory / tag) if tag else "auto", run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint in {directory}")
    return checkpoint


def run_categories(config: ExperimentConfig) -> list[dict[str, Any]]:
    """The run's categories in label order: COCO categories (``id``, ``name``) sorted by id, as
    ``CocoDetection`` maps them; panoptic ones with ``isthing``; a semantic model's classes with
    ``id`` = label."""
    task = experiment_spec(config).task
    if task == "semantic":
        _, (_, _, classes) = split_sources(config.data, task)
        names = classes if classes == ADE20K_CLASSES else read_class_names(classes)
        return [{"id": label, "name": name} for label, name in enumerate(names)]
    if config.data.dataset == "synthetic" and task != "panoptic":
        categories = CATEGORIES
    else:
        _, (_, ann, _) = split_sources(config.data, task)
        with open(ann, encoding="utf-8") as f:
            categories = json.load(f).get("categories", [])
    keys = ("id", "name", "isthing") if task == "panoptic" else ("id", "name")
    return [{k: c[k] for k in keys} for c in sorted(categories, key=lambda c: c["id"])]


def consolidated_state_dict(checkpoint: checkpointing.Checkpoint) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict (parameters and buffers) from a checkpoint of any ZeRO stage.

    ZeRO 1-3 hold the fp32 master weights in per-rank optimizer partitions, merged by DeepSpeed's
    own ``zero_to_fp32`` (which also returns the persistent buffers, BatchNorm statistics included);
    ZeRO-0 keeps the whole module in its model-states file.
    """
    if checkpoint.zero_stage == 0:
        states = torch.load(checkpoint.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        module = states["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.directory), tag=checkpoint.tag)


def trained_detector(run: TrainedRun) -> torch.nn.Module:
    """The plain torchvision detector of ``run`` holding its checkpoint's weights, in eval mode."""
    return detector_from_state_dict(consolidated_state_dict(run.checkpoint), run.spec, run.categories)



def command_parser(
    prog: str, doc: str, source: str = "run_dir",
    source_help: str = "the run's output_dir (holds config.json and checkpoints/)",
) -> argparse.ArgumentParser:
    """The arguments of every command that reads a run: the run (``source``) and ``--checkpoint TAG``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(source, help=source_help)
    parser.add_argument("--checkpoint", metavar="TAG",
                        help="a tag in RUN_DIR/checkpoints (default: the newest complete one, as --resume auto picks)")
    return parser
