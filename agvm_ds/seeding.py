"""Every random stream of a run, seeded from the experiment's ``seed`` and a position, in one place.

Why one module: a killed run resumes bitwise identical only if each stream restarts where it stood,
so each seed must be a pure function of the run's seed and where the run is (rank, epoch, sample,
step), never of the worker count, the wall clock or how many numbers were drawn before. These
formulas are part of what a checkpoint means: changing one changes what a resumed run replays.
"""
from __future__ import annotations

import numpy as np

__all__ = ["loader_seed", "sample_seed", "shuffle_rng", "step_seed", "synthetic_image_rng"]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """torch's RNG before training sample ``index``'s augmentation (flips, scales) in ``epoch``."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def step_seed(seed: int, rank: int, iteration: int, micro_batch: int) -> int:
    """torch's RNG before a forward pass on ``rank`` (RPN and RoI sampling): the ``micro_batch``-th of
    the accumulation window that ends in optimizer step ``iteration + 1``."""
    return ((seed * 1_000_003 + rank) * 10_000_019 + iteration) * 131 + micro_batch


def loader_seed(seed: int, rank: int) -> int:
    """The DataLoader generator of ``rank``, which draws its workers' base seeds."""
    return seed * 100_003 + rank


def shuffle_rng(seed: int, epoch: int) -> np.random.Generator:
    """The global permutation of ``epoch``'s training images, the same on every rank."""
    return np.random.default_rng([seed, epoch])


def synthetic_image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    """Everything drawn for one synthetic image: a function of the image alone, so sets are reproducible."""
    return np.random.default_rng([seed, split, index])
