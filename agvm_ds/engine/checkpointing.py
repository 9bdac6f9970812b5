"""Periodic checkpoints of a run and ``--resume auto``.

DeepSpeed writes model, optimizer and scheduler state per tag and a ``latest`` file; AGVM adds
its state as client state (``agvm_ds.save_checkpoint``), and the trainer adds where in the data
it stood, so a killed run continues from exactly the next micro-batch.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from ..agvm import load_checkpoint, save_checkpoint

__all__ = ["CHECKPOINT_DIR", "resolve_resume", "save", "load"]

CHECKPOINT_DIR = "checkpoints"


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """``auto``: the run's own checkpoints if any exist (else a fresh start); a path: must exist."""
    if resume is None:
        return None
    if resume == "auto":
        directory = run_dir / CHECKPOINT_DIR
        return directory if (directory / "latest").is_file() else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no DeepSpeed checkpoint directory there")
    return path


def save(engine, run_dir: Path, iteration: int, client_state: dict[str, Any], keep: int, is_main: bool) -> Path:
    """Saves tag ``iter_<N>`` and prunes all but the newest ``keep`` tags (collective)."""
    directory = run_dir / CHECKPOINT_DIR
    save_checkpoint(engine, str(directory), tag=f"iter_{iteration:08d}", client_state=client_state)
    if is_main:
        tags = sorted(p for p in directory.glob("iter_*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def load(engine, directory: Path) -> dict[str, Any]:
    """Restores engine, optimizer, scheduler and AGVM state; returns the trainer's client state."""
    _, client_state = load_checkpoint(engine, str(directory))
    return client_state
