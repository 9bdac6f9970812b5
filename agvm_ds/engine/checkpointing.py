"""Periodic checkpoints of a run, ``--resume auto``, and resuming on another number of ranks.

DeepSpeed writes model, optimizer and scheduler state per tag; AGVM adds its state as client state
(``agvm_ds.save_checkpoint``), and the trainer adds where in the data it stood, so a killed run
continues from exactly the next micro-batch.

A checkpoint counts only once it is complete. DeepSpeed's own ``latest`` file is written by rank 0
before the other ranks have finished their shards, so a crash while saving could leave ``latest``
pointing at a partial checkpoint. Here every rank finishes writing (DeepSpeed ends the save with a
barrier), then rank 0 writes ``manifest.json`` (each file's size) into the tag directory and only
then replaces ``latest`` atomically. ``--resume auto`` takes the newest tag whose files match its
manifest and says which incomplete ones it passed over, so a truncated or half-written checkpoint
falls back to the previous complete one instead of failing deep inside ``torch.load``.

Each tag also records the config it was trained with (``<tag>/config.json``), which a resume
compares with the new one (:mod:`agvm_ds.engine.run_start`). A save that fails (a full disk, a
read-only mount) removes its partial tag, leaves ``latest`` on the previous complete one, and raises
one line naming the tag, the cause and how much space a checkpoint of the run takes.

A checkpoint written by another number of ranks under ZeRO 1-3 holds the optimizer state in shards
of the old layout; it is converted once, by rank 0, with DeepSpeed's ``ds_to_universal`` into
``<tag>_universal`` and loaded as a universal checkpoint (``checkpoint.load_universal``). The AGVM
state and the trainer's position travel in the client state, which the conversion keeps.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..agvm import load_checkpoint, save_checkpoint
from ..errors import CorruptFile, ExitCode, FileAccessFailed, NoSpace, PeerFailed, classify
from .files import write_atomically

__all__ = ["CHECKPOINT_DIR", "RECORDED_CONFIG", "Checkpoint", "resolve_resume", "save", "load", "with_universal_load"]

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
#: the config a tag was trained with (the trainer's client state ``config``), beside its manifest
RECORDED_CONFIG = "config.json"
#: less free space than this after a failed write means the disk was full
_FULL_BELOW_BYTES = 1 << 20
LATEST = "latest"
UNIVERSAL_SUFFIX = "_universal"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint to resume from: ``directory/tag``, written by ``world_size`` ranks."""

    directory: Path
    tag: str
    world_size: int
    zero_stage: int
    notes: tuple[str, ...] = field(default=())

    @property
    def path(self) -> Path:
        return self.directory / self.tag

    def needs_universal_load(self, world_size: int, ds_config: dict[str, Any]) -> bool:
        """True when ZeRO-partitioned optimizer state must be re-partitioned for ``world_size`` ranks."""
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        return world_size != self.world_size and (stage > 0 or self.zero_stage > 0)


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Checkpoint]:
    """The checkpoint ``--resume`` names, checked complete.

    ``auto``: the newest complete checkpoint of the run, or None (a fresh start) if it has none; a
    path: a checkpoints directory (its newest complete tag) or one tag directory, which must be
    complete. Raises ValueError naming the checkpoint and the file at fault otherwise.
    """
    if resume is None:
        return None
    if resume == "auto":
        return _newest_complete(run_dir / CHECKPOINT_DIR, required=False)
    path = Path(resume)
    if (path / MANIFEST).is_file():
        problem = _problem(path)
        if problem:
            raise ValueError(f"--resume {resume}: checkpoint {path} is incomplete or corrupt: {problem}")
        return _checkpoint(path.parent, path.name)
    if path.is_dir():
        return _newest_complete(path, required=True)
    raise FileNotFoundError(f"--resume {resume}: no checkpoint directory there")


def save(engine, run_dir: Path, iteration: int, client_state: dict[str, Any], keep: int, is_main: bool) -> Path:
    """Saves tag ``iter_<N>``, marks it complete, points ``latest`` at it, and prunes all but the newest
    ``keep`` complete tags (collective)."""
    import deepspeed.comm as dist

    directory = run_dir / CHECKPOINT_DIR
    tag = f"iter_{iteration:08d}"
    layout = {"world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage()}
    started = time.perf_counter()
    try:
        if is_main:  # a tag saved again (after a fallback) is incomplete until its new manifest is written
            (directory / tag / MANIFEST).unlink(missing_ok=True)
        save_checkpoint(engine, str(directory), tag=tag, client_state=client_state, save_latest=False)
        if is_main:  # DeepSpeed's save ends with a barrier: every rank's files are on disk
            if "config" in client_state:
                write_atomically(directory / tag / RECORDED_CONFIG, json.dumps(client_state["config"], indent=2))
            _write_manifest(directory / tag, {**layout, "save_seconds": round(time.perf_counter() - started, 3)})
            write_atomically(directory / LATEST, tag)
    except (OSError, RuntimeError) as error:
        raise _save_failed(error, directory / tag, is_main) from error
    if is_main:
        _prune(directory, keep)
    dist.barrier()
    return directory


def _save_failed(error: Exception, tag_dir: Path, is_main: bool) -> Exception:
    """The one-line error for a failed save of ``tag_dir``.

    The tag has no manifest, so it is never resumed from; rank 0 also removes it, since it holds the
    space the next try needs. Only rank 0 removes it, so another rank whose files vanish meanwhile
    knows that rank 0's save failed (and rank 0 names the cause)."""
    known = classify(error)
    if known is not None and known[0] == ExitCode.PEER_FAILED:
        return error  # another rank failed; it reports its own cause
    if not is_main and not tag_dir.is_dir():
        return PeerFailed(f"checkpoint {tag_dir} was removed while this rank wrote it: rank 0's save failed")
    written, free = _bytes_under(tag_dir), None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(tag_dir.parent).free
    if is_main:
        shutil.rmtree(tag_dir, ignore_errors=True)
    previous = _newest_complete(tag_dir.parent, required=False)
    if previous is None:
        need, fallback = f"at least {_mb(written)}, written before it failed", "there is no complete checkpoint yet"
    else:
        size = sum(json.loads((previous.path / MANIFEST).read_text())["files"].values())
        need = f"about {_mb(size)}, the size of {previous.tag}"
        fallback = f"--resume auto continues from {previous.path}"
    partial = "removed" if is_main else "left without a manifest (never resumed from)"
    line = f"checkpoint {tag_dir} could not be written: {{}}; the partial checkpoint was {partial} and {fallback}"
    if (known is not None and known[0] == ExitCode.NO_SPACE) or (free is not None and free < _FULL_BELOW_BYTES):
        available = "" if free is None else f"{_mb(free)} free, "
        return NoSpace(line.format(f"no space left on the device ({available}a checkpoint of this run needs {need})"))
    return FileAccessFailed(line.format(known[1] if known is not None else str(error).strip().splitlines()[0]))


def _bytes_under(directory: Path) -> int:
    """What the files under ``directory`` hold, as far as they are still there (rank 0 may be
    removing them)."""
    total = 0
    with contextlib.suppress(OSError):
        for path in directory.rglob("*"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size if path.is_file() else 0
    return total


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def load(engine, checkpoint: Checkpoint) -> dict[str, Any]:
    """Restores engine, optimizer, scheduler and AGVM state; returns the trainer's client state."""
    import deepspeed.comm as dist

    tag = checkpoint.tag
    universal = engine.load_universal_checkpoint()
    if universal:
        tag = checkpoint.tag + UNIVERSAL_SUFFIX
        if dist.get_rank() == 0 and not (checkpoint.directory / tag / MANIFEST).is_file():
            _convert_to_universal(checkpoint.path, checkpoint.directory / tag)
        dist.barrier()
    hyperparameters = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in engine.optimizer.param_groups]
    try:
        _, client_state = load_checkpoint(engine, str(checkpoint.directory), tag=tag)
    except (RuntimeError, EOFError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptFile(f"checkpoint {checkpoint.directory / tag} could not be loaded ({first}): expected the "
                          f"DeepSpeed state of this run's model and optimizer") from error
    if universal:
        _load_buffers(engine.module, checkpoint.path)
        # ZeRO-3's universal load copies group 0's hyper-parameters into every group
        for group, values in zip(engine.optimizer.param_groups, hyperparameters):
            group.update(values)
    return client_state


def _load_buffers(module, tag_dir: Path) -> None:
    """Restores the module's buffers (BatchNorm statistics) from rank 0's model-states file: a universal
    load restores parameters only."""
    import torch

    path = min(tag_dir.glob("*mp_rank_00_model_states.pt"))
    saved = torch.load(path, map_location="cpu", weights_only=False)["module"]
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in saved:
                buffer.copy_(saved[name])


def with_universal_load(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config that loads universal checkpoints."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


# --- completeness -----------------------------------------------------------------------------


def _tags(directory: Path) -> list[Path]:
    """Tag directories, complete or not, oldest first (their universal conversions left out)."""
    return sorted(p for p in directory.glob("iter_*") if p.is_dir() and not p.name.endswith(UNIVERSAL_SUFFIX))


def _prune(directory: Path, keep: int) -> None:
    """Removes every tag older than the newest ``keep`` complete ones, with its universal conversion."""
    complete = [tag for tag in _tags(directory) if (tag / MANIFEST).is_file()]
    if len(complete) <= keep:
        return
    oldest_kept = complete[-keep]
    for tag in _tags(directory):
        if tag < oldest_kept:
            shutil.rmtree(tag, ignore_errors=True)
            shutil.rmtree(tag.with_name(tag.name + UNIVERSAL_SUFFIX), ignore_errors=True)


def _newest_complete(directory: Path, required: bool) -> Optional[Checkpoint]:
    notes = []
    candidates = _tags(directory)[::-1]
    for candidate in candidates:
        problem = _problem(candidate)
        if problem is None:
            if notes:
                notes.append(f"resuming from {candidate.name}, the newest complete checkpoint")
            return _checkpoint(directory, candidate.name, tuple(notes))
        notes.append(f"skipping checkpoint {candidate}: {problem}")
    if required:
        raise ValueError(f"no complete checkpoint in {directory}: {'; '.join(notes) or 'it holds no iter_* tag'}")
    return None


def _problem(tag_dir: Path) -> Optional[str]:
    """Why ``tag_dir`` cannot be resumed from, or None if it is complete."""
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        return f"no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        return f"{manifest_path} is not valid JSON ({error})"
    for name, size in manifest["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
        if path.suffix == ".pt" and not zipfile.is_zipfile(path):
            return f"{path} is not a readable torch file"
    return None


def _checkpoint(directory: Path, tag: str, notes: tuple[str, ...] = ()) -> Checkpoint:
    manifest = json.loads((directory / tag / MANIFEST).read_text())
    return Checkpoint(directory, tag, manifest["world_size"], manifest["zero_stage"], notes)


def _write_manifest(tag_dir: Path, layout: dict[str, int]) -> None:
    """Marks ``tag_dir`` complete: the ranks that wrote it, and every file's size."""
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_atomically(tag_dir / MANIFEST, json.dumps({**layout, "files": files}, indent=1))


def _convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of one tag, in this process; marked complete like a save."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(target, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    ds_to_universal.main(args)
    manifest = json.loads((source / MANIFEST).read_text())
    _write_manifest(target, {"world_size": manifest["world_size"], "zero_stage": manifest["zero_stage"]})
