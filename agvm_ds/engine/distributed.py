"""A process's place in the job: the process group, and a world of one when no launcher made one.

``deepspeed.init_distributed`` reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (launchers set
them; ``world.slurm_environment`` maps a Slurm task's); a process started on its own gets a world of
one on a free port from :func:`single_process_world`. :func:`init_distributed` is DeepSpeed's,
with a bounded timeout and without the shared-memory segment DeepSpeed's CPU all-reduce leaks.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Optional

__all__ = ["init_distributed", "single_process_world"]


def single_process_world() -> None:
    """Lets ``deepspeed.init_distributed`` build a world of one when no launcher set one up, on a free
    port, so two single-process runs on one machine do not collide."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(probe.getsockname()[1])

def init_distributed(dist_backend: Optional[str] = None, timeout: Optional[datetime.timedelta] = None) -> None:
    """``deepspeed.init_distributed`` (a no-op when a process group exists) without its /dev/shm leak.

    Call it first thing in a process: a run that fails later during start-up (a bad data set, a
    refused configuration) then leaves no shared-memory segment behind. ``timeout`` bounds every
    collective, so a dead peer ends the job instead of hanging it for DeepSpeed's default 10 minutes.
    """
    import deepspeed

    kwargs = {} if timeout is None else {"timeout": timeout}
    deepspeed.init_distributed(dist_backend=dist_backend, verbose=False, **kwargs)
    _unlink_cpu_allreduce_segment()


def _unlink_cpu_allreduce_segment() -> None:
    """Removes the name of this rank's DeepSpeed CPU all-reduce segment from /dev/shm.

    DeepSpeed's CPU comm op (0.19.8, ``ops/csrc/cpu/comm/shm.cpp``) creates a 66 MB shared-memory
    segment per rank when the process group starts and never unlinks it, so every CPU run would
    leave 66 MB per rank in /dev/shm until the machine runs out of memory. Every rank maps its
    peers' segments inside ``init_distributed``; after a barrier the names are no longer needed and
    the mappings stay valid, so a killed run leaks nothing either.
    """
    import deepspeed.comm as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None or not os.path.isdir("/dev/shm"):
        return
    dist.barrier()
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    if os.path.exists(name):
        os.unlink(name)
