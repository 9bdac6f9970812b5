"""``DataLoader`` construction for detection: sharding, aspect-ratio grouping, exact resume.

Why a builder: the rules that keep a multi-rank run correct (same batch count on every rank, an
order that is a pure function of (seed, epoch), resume at a batch, every eval image seen once)
live in the samplers of :mod:`agvm_ds.data.sampler`; this module wires them to a ``DataLoader``
so the trainer cannot combine them wrongly.

Training loop sketch::

    loader = build_detection_loader(ds, batch_size=2, rank=r, world_size=w, train=True,
                                    num_workers=2, seed=0, epoch=start_epoch, start_batch=k)
    for epoch in range(start_epoch, epochs):
        if epoch != start_epoch:
            loader.batch_sampler.set_epoch(epoch)     # start_batch resets to 0
        for images, targets in loader: ...
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Subset

from ..seeding import loader_seed
from .sampler import DistributedGroupedBatchSampler, ShardedEvalSampler, aspect_ratio_group_ids

__all__ = ["build_detection_loader", "collate_detection"]


def collate_detection(batch: Sequence[tuple[Any, dict[str, Any]]]) -> tuple[list[Any], list[dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])``, the torchvision detector input.

    Images keep their own sizes; the model's ``GeneralizedRCNNTransform`` pads the batch.
    """
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def build_detection_loader(
    dataset: Dataset,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    train: bool = True,
    num_workers: int = 2,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    aspect_ratio_grouping: bool = True,
    group_factor: int = 3,
    even_eval_batches: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """A loader yielding ``(list[image], list[target])`` batches for this rank.

    Train (``train=True``): a :class:`DistributedGroupedBatchSampler` (``loader.batch_sampler``)
    that shuffles with ``(seed, epoch)``, groups by aspect ratio (``group_factor`` as in the
    torchvision references; the dataset must have ``aspect_ratios``, e.g. :class:`CocoDetection`
    or a ``Subset`` of one), gives every rank ``len(loader)`` batches and starts at
    ``start_batch``. ``batch_size`` is per rank.

    Eval (``train=False``): dataset order, round-robin shards covering every image exactly once
    (:class:`ShardedEvalSampler`), batches of ``batch_size`` with the last one possibly short; no
    grouping. ``even_eval_batches=True`` pads shards to equal length (for ZeRO-3 inference).

    A resumed epoch replays the same images in the same batches. Their random flips and scales
    replay too when the dataset seeds each sample's augmentation from (seed, epoch, index), as the
    trainer's ``SeededSamples`` does; the loader's own generator (``seeding.loader_seed``) only
    draws the workers' base seeds.
    """
    if train:
        if aspect_ratio_grouping:
            group_ids = aspect_ratio_group_ids(_aspect_ratios(dataset), group_factor)
        else:
            group_ids = [0] * len(dataset)  # type: ignore[arg-type]
        batch_sampler: Any = DistributedGroupedBatchSampler(
            group_ids, batch_size, rank, world_size, seed=seed, shuffle=True, epoch=epoch, start_batch=start_batch
        )
    else:
        if start_batch:
            raise ValueError("start_batch is for resuming training; evaluation always starts at batch 0")
        shard = ShardedEvalSampler(len(dataset), rank, world_size, even=even_eval_batches)  # type: ignore[arg-type]
        batch_sampler = BatchSampler(shard, batch_size, drop_last=False)
    generator = torch.Generator()
    generator.manual_seed(loader_seed(seed, rank))
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_detection,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=generator,
    )


def _aspect_ratios(dataset: Dataset) -> list[float]:
    """Width/height per index, from the dataset's metadata (no image is read)."""
    if isinstance(dataset, Subset):
        parent = _aspect_ratios(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    ratios = getattr(dataset, "aspect_ratios", None)
    if ratios is None:
        raise TypeError(
            f"{type(dataset).__name__} has no 'aspect_ratios' (width / height per index); "
            "add one or pass aspect_ratio_grouping=False"
        )
    return list(ratios)
