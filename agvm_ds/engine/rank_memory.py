"""Each rank's memory, sampled in the background and left where the other ranks can read it.

A rank killed by the kernel's out-of-memory killer gets SIGKILL: it cannot say anything, and its
peers only see their next collective fail. So every rank writes a small record every few seconds
(resident and peak memory, iteration, status) into the run directory; when a peer's process is gone
and its record still says ``running``, it did not raise (a Python error is recorded first): it was
killed by a signal it could not catch, and the record says how much memory it held by then. The
same records give the benchmarks each rank's peak resident memory.

:func:`return_freed_tensors_at_once` keeps resident memory close to what is live on CPU ranks.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["RankMemory", "read_record", "describe_death", "host_memory", "return_freed_tensors_at_once"]

RUNNING = "running"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_tensors_at_once() -> bool:
    """Serves every allocation of 1 MiB or more by mmap, so that a freed tensor goes back to the system.

    glibc raises its mmap threshold to the size of each mmapped block freed (up to 32 MB), after
    which tensors below it come from the heap, whose free space stays resident when fragmented.
    A ZeRO-3 step frees and reallocates gathered parameters, gradient buckets and the lazily built
    Adam state in between: the 1B SwinV2 job on 2 CPU ranks grew past 11.4 GB per rank and was
    killed for memory with glibc's default, and held 9.4 GB per rank with a fixed 1 MiB threshold.
    A fixed threshold also stops glibc's adjustment (as setting ``MALLOC_MMAP_THRESHOLD_`` does).
    Returns False where the C library has no ``mallopt`` (not glibc).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def _resident_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine, from /proc/meminfo."""
    values = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, rest = line.split(":", 1)
            values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemAvailable"]


class RankMemory:
    """Writes ``directory/rank_<rank>.json`` every ``interval`` seconds from a daemon thread.

    Args:
        directory: shared by the ranks (the run directory, which multi-node runs keep on a shared
            file system for their checkpoints anyway).
        iteration: returns the current iteration (read from the sampling thread).
    """

    def __init__(self, directory: Path, rank: int, iteration: Callable[[], int], interval: float = 2.0) -> None:
        self.path = Path(directory) / f"rank_{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._iteration = iteration
        self._interval = interval
        self._status = RUNNING
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._start_rss = _resident_bytes()
        self.write()
        self._thread = threading.Thread(target=self._run, name="rank-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.write()

    def write(self) -> None:
        total, available = host_memory()
        record = {"pid": os.getpid(), "host": socket.gethostname(), "status": self._status,
                  "iteration": self._iteration(), "rss_bytes": _resident_bytes(), "start_rss_bytes": self._start_rss,
                  "peak_rss_bytes": _peak_resident_bytes(), "host_total_bytes": total,
                  "host_available_bytes": available, "time": time.time()}
        with self._lock:
            tmp = self.path.with_name(self.path.name + ".tmp")
            try:
                tmp.write_text(json.dumps(record))
                os.replace(tmp, self.path)
            except OSError:  # a full or read-only disk: the training's own save reports it, in one line
                tmp.unlink(missing_ok=True)

    def close(self, status: str) -> None:
        """Stops sampling and records how this rank ended (``finished``, or the error it raised)."""
        self._stop.set()
        self._thread.join()
        self._status = status
        self.write()


def read_record(directory: Path, rank: int) -> Optional[dict[str, Any]]:
    try:
        return json.loads((Path(directory) / f"rank_{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def describe_death(record: Optional[dict[str, Any]], rank: int) -> str:
    """Why rank ``rank`` is probably gone, from its last record; empty when nothing can be said."""
    if record is None:
        return ""
    if record["status"] != RUNNING:
        return f"rank {rank} reported: {record['status']}"
    age = time.time() - record["time"]
    return (f"rank {rank} raised no error: it was killed by a signal it could not catch, SIGKILL (signal 9), "
            f"whose usual sender is the kernel's out-of-memory killer; its last measured memory: "
            f"{record['rss_bytes'] / 1e9:.1f} GB resident (peak {record['peak_rss_bytes'] / 1e9:.1f} GB) at "
            f"iteration {record['iteration']}, {age:.0f} s before, with {record['host_available_bytes'] / 1e9:.1f} "
            f"of {record['host_total_bytes'] / 1e9:.1f} GB available on {record['host']}")
