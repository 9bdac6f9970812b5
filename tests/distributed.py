"""Runs a function on N real CPU ranks (gloo), DeepSpeed's way, and returns each rank's result.

No mocks: each rank is a fresh spawned (or forked) process with RANK/WORLD_SIZE/MASTER_ADDR set as the
``deepspeed`` launcher sets them, and ``agvm_ds.engine.distributed.init_distributed`` (DeepSpeed's, without its
/dev/shm leak) builds the process group.
"""
from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable, rank: int, world_size: int, port: int, args: tuple, queue) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        import torch

        from agvm_ds.engine.distributed import (
            init_distributed,  # deepspeed.init_distributed, leaving no /dev/shm segment
        )

        torch.set_num_threads(1)
        init_distributed(dist_backend="gloo")
        result = fn(rank, world_size, *args)
        buffer = io.BytesIO()  # tensors as bytes: shared-memory handles die with this process
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report, so the parent fails with the rank's traceback instead of hanging
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _preload_deepspeed() -> None:
    """Loads here what every rank would load, so that forked ranks start with it instead of each
    spending seconds of CPU: torch._dynamo (imported by a torch optimizer's first construction),
    the modules DeepSpeed's engine imports while it starts (its ZeRO optimizer check imports the
    Muon optimizer and with it torch.compile) and its CPU comm op (JIT-loaded through ninja). The
    comm op is only loaded: each rank still creates its own shared memory when its group starts."""
    import deepspeed.module_inject.auto_ep_config  # noqa: F401
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import torch._dynamo  # noqa: F401
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600,
              start_method: str = "spawn") -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` ranks; returns results ordered by rank.

    ``start_method="fork"`` starts the ranks from this process after loading DeepSpeed here
    (``_preload_deepspeed``), so they share its torch and DeepSpeed (copy-on-write) instead of each
    importing them: what makes tens of ranks affordable on a few cores. Spawn stays the default: a
    forked rank inherits whatever this process holds.
    """
    if start_method == "fork":
        _preload_deepspeed()
    ctx = mp.get_context(start_method)
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, queue)) for r in range(world_size)]
    gc.freeze()  # a forked rank's garbage collector would otherwise write to, and so copy, every inherited object
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()
    results: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
