"""The start of a training job on its run directory: take the lock, check a resume against the
checkpoint's config, record the config, before anything else is loaded or written.

Why collective: rank 0 does this work, and when it fails (another job holds the directory, a
refused resume, a read-only or full disk) every other rank must stop too, at once and quietly,
instead of reaching the next collective and dying with a gloo traceback. So rank 0 broadcasts the
outcome; the other ranks raise a quiet :class:`~agvm_ds.errors.PeerFailed` with rank 0's exit code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import ExitCode, PeerFailed, classify
from . import run_config
from .checkpointing import RECORDED_CONFIG, Checkpoint
from .config import ExperimentConfig
from .run_lock import RunLock

__all__ = ["StartedRun", "start_run"]

#: The data keys that decide the classes (the heads' outputs).
_DATA_FILES = ("dataset", "train_ann", "val_ann")


@dataclass
class StartedRun:
    """What the start decided: the lock (rank 0 only) and the lines to log (the accepted changes)."""

    lock: Optional[RunLock] = None
    notes: list[str] = field(default_factory=list)


def start_run(run_dir: Path, config: ExperimentConfig, checkpoint: Optional[Checkpoint], ds_config: Mapping[str, Any],
              is_main: bool) -> StartedRun:
    """Collective. On rank 0: creates ``run_dir``, takes its lock, compares ``checkpoint``'s config with
    ``config`` and its DeepSpeed config (raising ResumeRefused) and records the start; every rank gets
    the outcome."""
    import deepspeed.comm as dist

    started, failure, outcome = StartedRun(), None, [None]
    if is_main:
        try:
            zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
            started = _start_on_main(run_dir, config, checkpoint, zero_stage)
        except Exception as error:  # noqa: BLE001 - the other ranks must hear of any failure
            failure = error
            code, line = classify(error) or (ExitCode.FAILED, f"{type(error).__name__}: {error}")
            outcome = [(int(code), line)]
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        code, line = outcome[0]
        raise PeerFailed(f"rank 0 could not start the run: {line}", code=ExitCode(code), quiet=True)
    return started


def _start_on_main(run_dir: Path, config: ExperimentConfig, checkpoint: Optional[Checkpoint],
                   zero_stage: int) -> StartedRun:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(run_dir)
    try:
        if checkpoint is None:
            run_config.record_start(run_dir, config.to_dict(), "start")
            return StartedRun(lock)
        recorded, source = _recorded_config(checkpoint)
        changes = run_config.compare(*_comparable(recorded, checkpoint.zero_stage, config.to_dict(), zero_stage))
        if changes.fixed:
            raise changes.refusal(str(checkpoint.path), source)
        run_config.record_start(run_dir, config.to_dict(), "resume", str(checkpoint.path), changes)
        notes = [f"config changed on resume from {checkpoint.path}: {changes.describe_allowed()}"] if changes.allowed \
            else []
        return StartedRun(lock, notes)
    except BaseException:
        lock.release()
        raise


def _recorded_config(checkpoint: Checkpoint) -> tuple[dict[str, Any], Path]:
    """The config ``checkpoint`` was trained with: its own record, or (a checkpoint written before
    tags recorded it) the config.json of the run that wrote it."""
    own = checkpoint.path / RECORDED_CONFIG
    source = own if own.is_file() else checkpoint.directory.parent / run_config.CONFIG_FILE
    return run_config.read_recorded(source), source


def _comparable(recorded: Mapping[str, Any], recorded_stage: int, new: Mapping[str, Any],
                new_stage: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both configs with the facts the fixed keys need that a config only implies: the ZeRO stage
    (``deepspeed.zero_stage``) and, when the data set's files differ, its classes (``data.classes``;
    left out when the checkpoint's annotation file is gone, so a moved data set can still resume)."""
    old, now = _with_stage(recorded, recorded_stage), _with_stage(new, new_stage)
    if any(old["data"].get(key) != now["data"].get(key) for key in _DATA_FILES):
        classes = _classes(old["data"]), _classes(now["data"])
        if None not in classes:
            old["data"]["classes"], now["data"]["classes"] = classes
    return old, now


def _with_stage(values: Mapping[str, Any], zero_stage: int) -> dict[str, Any]:
    """A copy of ``values`` whose ``deepspeed`` key holds the config file and the ZeRO stage."""
    return {**values, "data": dict(values.get("data", {})),
            "deepspeed": {"file": values.get("deepspeed"), "zero_stage": zero_stage}}


def _classes(data: Mapping[str, Any]) -> Optional[list[str]]:
    """``id:name`` of each category, as the run's heads predict them; None if the annotation file is gone."""
    if data.get("dataset") == "synthetic":
        from ..data.synthetic import CATEGORIES

        categories = CATEGORIES
    else:
        try:
            with open(data["val_ann"], encoding="utf-8") as f:
                categories = json.load(f).get("categories", [])
        except (OSError, ValueError, TypeError, AttributeError):
            return None
    return [f"{c['id']}:{c['name']}" for c in sorted(categories, key=lambda c: c["id"])]
