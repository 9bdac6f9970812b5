"""Deterministic, resumable, rank-sharded batch samplers for detection.

Why not ``DistributedSampler`` + torchvision's ``GroupedBatchSampler``: that pair groups each
rank's samples independently, so exact resume needs the sampler state, and it refills leftover
groups with repeated samples. Here one *global* plan is a pure function of (seed, epoch):

1. permute all indices with ``numpy.random.default_rng([seed, epoch])`` (train) or keep order;
2. walk the permutation, filling one buffer per aspect-ratio group; a full buffer becomes a batch
   (so every batch holds images of one group, as in ``GroupedBatchSampler``);
3. drop the incomplete buffers left at the end and the last ``len(batches) % world_size`` batches;
4. deal batches round-robin: rank ``r`` gets batches ``r, r + W, r + 2W, ...``.

Consequences: ranks are disjoint, every rank has the same number of batches (DeepSpeed ranks stay
in lockstep), that number is the same every epoch (``sum_g floor(n_g / B) // W``), and batch
``k`` of an epoch can be produced without producing batches ``0..k-1`` of the data. A few images
(fewer than ``num_groups * B + W * B``) are skipped per epoch, different ones each epoch.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..seeding import shuffle_rng

__all__ = ["DistributedGroupedBatchSampler", "ShardedEvalSampler", "aspect_ratio_group_ids"]


def aspect_ratio_group_ids(aspect_ratios: Sequence[float], group_factor: int = 3) -> list[int]:
    """Quantise width/height ratios into groups, as torchvision's ``create_aspect_ratio_groups``.

    Bin edges are ``2 ** linspace(-1, 1, 2 * group_factor + 1)``; ``group_factor=0`` gives two
    groups, portrait (< 1) and landscape/square (>= 1).
    """
    if group_factor < 0:
        raise ValueError(f"group_factor must be >= 0, got {group_factor}")
    bins = sorted((2 ** np.linspace(-1, 1, 2 * group_factor + 1)).tolist()) if group_factor > 0 else [1.0]
    return [bisect.bisect_right(bins, float(r)) for r in aspect_ratios]


class DistributedGroupedBatchSampler(Sampler[list[int]]):
    """This rank's batches of one epoch, from the global plan described in the module docstring.

    Args:
        group_ids: one group id per dataset index (all equal: no grouping).
        batch_size: images per rank per step (DeepSpeed's ``train_micro_batch_size_per_gpu``).
        rank, world_size: this rank and the number of ranks; no process group is needed.
        seed: shuffling seed, shared by all ranks.
        shuffle: permute each epoch (train) or keep dataset order.
        epoch, start_batch: see :meth:`set_epoch`.
    """

    def __init__(
        self,
        group_ids: Sequence[int],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle: bool = True,
        epoch: int = 0,
        start_batch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.group_ids = np.asarray(group_ids, dtype=np.int64)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        _, counts = np.unique(self.group_ids, return_counts=True)
        full_batches = int(sum(int(c) // batch_size for c in counts))
        #: Batches each rank gets in a full epoch (the same for every rank and epoch).
        self.batches_per_epoch = full_batches // world_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(self.group_ids)} images in {len(counts)} aspect-ratio group(s) do not fill one batch "
                f"of {batch_size} per rank on {world_size} rank(s)"
            )
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate; ``start_batch=k`` skips this rank's first ``k`` batches.

        Call it before every epoch (``start_batch`` is not carried over to the next call).
        Resuming after ``k`` optimizer steps of an epoch is ``set_epoch(epoch, start_batch=k)``.
        """
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_plan(self) -> list[list[int]]:
        """All ranks' batches of the current epoch, in step order (global batch ``k`` of step
        ``s`` is ``plan[s * world_size + r]``)."""
        n = len(self.group_ids)
        order = shuffle_rng(self.seed, self.epoch).permutation(n) if self.shuffle else np.arange(n)
        buffers: dict[int, list[int]] = {}
        batches: list[list[int]] = []
        for index in order.tolist():
            buffer = buffers.setdefault(int(self.group_ids[index]), [])
            buffer.append(index)
            if len(buffer) == self.batch_size:
                batches.append(buffer)
                buffers[int(self.group_ids[index])] = []
        return batches[: self.batches_per_epoch * self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.epoch_plan()[self.rank :: self.world_size]
        yield from mine[self.start_batch :]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class ShardedEvalSampler(Sampler[int]):
    """Dataset order, sharded round-robin: rank ``r`` gets indices ``r, r + W, r + 2W, ...``.

    Every index appears on exactly one rank, so evaluation needs no de-duplication. Shards then
    differ by at most one image, so ranks may run one batch more or less than others; that is
    fine for data-parallel inference but not for ZeRO-3, where every forward is a collective:
    there pass ``even=True``, which pads short shards by repeating their last index (index 0 on
    a rank with none, an image another rank owns). The shard's own indices come first: ``owned``
    counts them, and an evaluation drops the outputs past it, so no image counts twice, whatever
    its evaluator does with repeated ids.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, even: bool = False) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.indices = list(range(rank, num_samples, world_size))
        self.owned = len(self.indices)
        if even and num_samples > 0:
            per_rank = math.ceil(num_samples / world_size)
            pad = self.indices[-1] if self.indices else 0
            self.indices += [pad] * (per_rank - len(self.indices))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
