"""The team as torch.distributed ranks: one agent per process, gloo on CPU, NCCL on GPU.

Ranks come from the environment the launcher sets: ``torchrun`` and the ``deepspeed`` launcher set
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; under Slurm an sbatch script exports the same names (SLURM_PROCID and
SLURM_NTASKS are read when RANK/WORLD_SIZE are absent, MASTER_ADDR/MASTER_PORT must be exported). With no
launcher the world is one agent, which trains alone.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["PeerGroup", "init_peers"]

# torch >= 2.14 renames all_gather_into_tensor (same arguments) and warns on every call of the old name
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def init_peers(device: str) -> "PeerGroup":
    """Joins (or forms) the process group and returns this rank's view of it."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world_size = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world_size} but {missing} not set: start the team with torchrun, "
                               "the deepspeed launcher, or an sbatch script that exports them")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)
    return PeerGroup(rank, world_size, torch_device)


class PeerGroup:
    """All-gathers between the agents, counting the bytes each agent sends.

    An all-gather of an ``m``-byte message sends ``m`` bytes to each of the ``N - 1`` peers (a ring all-gather
    moves exactly that per rank), so ``bytes_sent`` grows by ``(N - 1) m`` per call. ``exchange`` is the
    knowledge-transfer channel that is counted; ``gather_metrics`` carries logging only and is not.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.bytes_sent = 0

    @property
    def peers(self) -> list[int]:
        return [r for r in range(self.world_size) if r != self.rank]

    def exchange(self, message: torch.Tensor) -> torch.Tensor:
        """Every agent's ``message`` (same shape on every rank), stacked by rank: ``[world_size, *shape]``."""
        self.bytes_sent += message.numel() * message.element_size() * (self.world_size - 1)
        return self._all_gather(message)

    def gather_metrics(self, values: list[float]) -> torch.Tensor:
        return self._all_gather(torch.tensor(values, dtype=torch.float64))

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous().to(self.device)
        if self.world_size == 1:
            return tensor[None]
        out = torch.empty(self.world_size * tensor.numel(), dtype=tensor.dtype, device=self.device)
        _ALL_GATHER(out, tensor.flatten())
        return out.view(self.world_size, *tensor.shape)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
