"""BatchNorm running statistics: one set for all ranks, and none from a skipped micro-batch.

DeepSpeed, unlike DDP (``broadcast_buffers``), never touches buffers, so each rank's BatchNorm
running statistics drift apart on their own shard of the data. Evaluation shares the validation
images across ranks and a checkpoint stores rank 0's copy only: metrics would depend on the number
of ranks and a resumed run would not be exact. :func:`average_running_stats` makes every rank
hold the same statistics (their mean, which estimates the global batch's statistics better than
any one rank's); the trainer calls it before every evaluation and every checkpoint, at points that
a resumed run replays, so resume stays exact.

A micro-batch whose loss is non-finite is skipped after its forward pass, which has already folded
its (possibly NaN) activations into the running statistics: :class:`RunningStatsSnapshot` restores
them, so a skipped micro-batch leaves no trace (:meth:`RunningStatsSnapshot.keep_if` does so on
the device, for a skip the host learns of only at the end of the accumulation window).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["RunningStatsSnapshot", "average_running_stats", "running_stats"]


def running_stats(module: nn.Module) -> list[torch.Tensor]:
    """The running statistics (mean, var and batch counter) of every BatchNorm that tracks them."""
    return [
        buffer
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]


@torch.no_grad()
def average_running_stats(module: nn.Module) -> None:
    """Replaces every rank's BatchNorm running statistics by their mean over the process group.

    Averaged in fp32 whatever the buffers' dtype, then broadcast from rank 0, so that every rank
    holds bitwise the same values. A no-op without a process group or with one rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    stats = [b for b in running_stats(module) if b.is_floating_point()]
    if not stats:
        return
    flat = torch.cat([b.detach().float().reshape(-1) for b in stats])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    dist.broadcast(flat, src=0)
    offset = 0
    for buffer in stats:
        buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()


class RunningStatsSnapshot:
    """A copy of a module's BatchNorm running statistics, to restore after a skipped forward pass.

    The buffers are looked up at the first :meth:`take`, so a snapshot made before DeepSpeed moves
    the module to its device follows the moved buffers.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._buffers: Optional[list[torch.Tensor]] = None
        self._saved: list[torch.Tensor] = []

    def take(self) -> None:
        if self._buffers is None:
            self._buffers = running_stats(self._module)
        self._saved = [b.detach().clone() for b in self._buffers]

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, saved in zip(self._buffers or [], self._saved):
            buffer.copy_(saved)

    @torch.no_grad()
    def keep_if(self, keep: torch.Tensor) -> None:
        """Restores the snapshot unless the device flag ``keep`` is true, without reading it on the host."""
        for buffer, saved in zip(self._buffers or [], self._saved):
            buffer.copy_(torch.where(keep, buffer, saved))
