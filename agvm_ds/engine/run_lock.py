"""One output directory, one run: a lock file that rank 0 holds while a job trains.

Why: two jobs writing the same run directory overwrite each other's checkpoints, logs and config,
and neither notices. ``RUN_DIR/run.lock`` names its holder (host, pid, the process's start time,
when it started and its command line); it is created atomically (a hard link of a complete file,
so no reader ever sees half a holder), removed when the holder exits, and left behind only by a
crash. A lock is stale when its holder is on this host and that process is gone, or the pid now
belongs to another process (its start time differs: pids are reused); a stale lock is taken over
under an ``flock`` so that two jobs cannot both take it. A holder on another host cannot be
checked from here, so it is never taken over: the message says which file to remove.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import CorruptFile, RunDirLocked

__all__ = ["LOCK_FILE", "RunLock", "process_start_time"]

LOCK_FILE = "run.lock"


def process_start_time(pid: int) -> Optional[int]:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # the command name in parentheses may hold spaces


def _boot_id() -> str:
    """Start times count from boot: after a reboot every pid is another process."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _this_process() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_time": process_start_time(pid), "boot_id": _boot_id(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)}


@dataclass
class RunLock:
    """The lock of ``run_dir``, held by this process from :meth:`acquire` until :meth:`release` (or exit)."""

    path: Path
    holder: dict[str, Any]

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Takes the lock, or raises :class:`RunDirLocked` naming the directory and the live holder."""
        path = Path(run_dir) / LOCK_FILE
        me = _this_process()
        for _ in range(3):  # a holder that exits between our attempts frees the lock
            if _create(path, me):
                lock = cls(path, me)
                atexit.register(lock.release)
                return lock
            holder = _read(path)
            if holder is None:
                continue  # removed meanwhile
            if _same_process(holder, me):  # this process again (a second Trainer in one job)
                return cls(path, holder)
            problem = _alive(holder)
            if problem is not None:
                remote = holder["host"] != me["host"]
                raise RunDirLocked(f"{run_dir} is in use by another job: {problem}; wait for it to end, or use "
                                   "another output_dir" + (f" (remove {path} if that job is gone)" if remote else ""))
            _take_over_stale(path, holder)
        raise RunDirLocked(f"{run_dir}: could not take {path}: other jobs keep taking it")

    def release(self) -> None:
        """Removes the lock if it is still ours (a no-op after the first call)."""
        holder = _read(self.path) if self.path.exists() else None
        if holder is not None and _same_process(holder, self.holder):
            self.path.unlink(missing_ok=True)
        atexit.unregister(self.release)


def _create(path: Path, holder: dict[str, Any]) -> bool:
    """Writes the holder to a private file and links it to ``path``: True if the link made the lock."""
    tmp = path.with_name(f".{path.name}.{holder['host']}.{holder['pid']}")
    tmp.write_text(json.dumps(holder))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> Optional[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError as error:
        raise CorruptFile(f"{path}: not a run lock ({error}); remove it if no job is using the directory") from None
    if not isinstance(holder, dict) or not {"host", "pid", "start_time"} <= holder.keys():
        raise CorruptFile(f"{path}: not a run lock (expected host, pid and start_time); remove it if no job is "
                          "using the directory")
    return holder


def _same_process(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(key) == b.get(key) for key in ("host", "pid", "start_time", "boot_id"))


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder['pid']} on {holder['host']}, started {holder.get('started', '?')}"
            f" ({holder.get('command', '?')})")


def _alive(holder: dict[str, Any]) -> Optional[str]:
    """Why the holder still holds the lock, or None if the lock is stale."""
    if holder["host"] != socket.gethostname():
        return f"held by {_describe(holder)}, which cannot be checked from {socket.gethostname()}"
    if holder.get("boot_id", "") != _boot_id():
        return None  # the machine rebooted since
    start = process_start_time(int(holder["pid"]))
    if start is None or start != holder["start_time"]:
        return None  # gone, or its pid was reused by another process
    return f"held by {_describe(holder)}"


def _take_over_stale(path: Path, stale: dict[str, Any]) -> None:
    """Removes ``path`` if it still holds ``stale``; the flock makes check-and-remove one step, so a
    job that took the lock a moment ago does not lose it to another that read the stale holder."""
    with open(path.with_name(f".{path.name}.guard"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if _read(path) == stale:
            path.unlink()
