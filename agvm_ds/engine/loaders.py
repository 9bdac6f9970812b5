"""Datasets and loaders of an experiment, from its ``data`` section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import CocoDetection, SyntheticPaths, build_detection_loader, build_transforms, make_synthetic_coco
from ..seeding import sample_seed
from .config import DataConfig

__all__ = ["Datasets", "SeededSamples", "TrainLoaders", "build_datasets", "train_loader", "val_loader", "val_split"]


class SeededSamples(Dataset):
    """Seeds torch's RNG from (seed, epoch, index) before each sample's augmentation.

    The transforms draw flips and scales from torch's global RNG; seeding per sample makes them a
    function of the sample alone, independent of worker count and of where a run resumed, so a
    resumed epoch replays exactly the augmentations an uninterrupted one would have seen.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def aspect_ratios(self) -> list[float]:
        return self.dataset.aspect_ratios  # type: ignore[attr-defined]

    def __getitem__(self, index: int) -> Any:
        torch.manual_seed(sample_seed(self.seed, self.epoch, index))
        return self.dataset[index]


@dataclass
class Datasets:
    train: SeededSamples
    val: CocoDetection

    @property
    def num_classes(self) -> int:
        return self.val.num_classes


def build_datasets(
    config: DataConfig, with_masks: bool, seed: int, is_main: bool, barrier: Callable[[], None]
) -> Datasets:
    """Builds both splits; the synthetic set is generated once, by the main rank, before the others read it."""
    if config.dataset == "synthetic" and is_main:
        _synthetic(config)
    barrier()
    train_images, train_ann, val_images, val_ann = _split_paths(config)
    train_transforms = build_transforms(
        True, config.recipe, min_size=config.scales, max_size=config.max_size, lsj_size=config.lsj_size
    )
    train = CocoDetection(train_images, train_ann, train_transforms, with_masks=with_masks, remove_empty=True)
    val = CocoDetection(val_images, val_ann, build_transforms(False, config.recipe), with_masks=with_masks)
    return Datasets(SeededSamples(train, seed), val)


def val_split(config: DataConfig) -> tuple[str, str]:
    """(image folder, annotation file) of the validation split; the synthetic set is generated if missing."""
    _, _, images, ann = _split_paths(config)
    return str(images), str(ann)


def _split_paths(config: DataConfig) -> tuple[Any, Any, Any, Any]:
    """Train images, train annotations, val images, val annotations."""
    if config.dataset == "synthetic":
        paths = _synthetic(config)
        return paths.train_images, paths.train_ann, paths.val_images, paths.val_ann
    return config.train_images, config.train_ann, config.val_images, config.val_ann


def _synthetic(config: DataConfig) -> SyntheticPaths:
    """The synthetic set of ``config`` (reused when its stamp matches, generated otherwise)."""
    return make_synthetic_coco(config.root, config.synthetic_train, config.synthetic_val, config.synthetic_size, seed=0)


def train_loader(datasets: Datasets, config: DataConfig, rank: int, world: int, seed: int, epoch: int,
                 start_batch: int) -> DataLoader:
    """This rank's training micro-batches of ``epoch`` from micro-batch ``start_batch`` on (a resumed epoch)."""
    datasets.train.epoch = epoch
    return build_detection_loader(
        datasets.train, config.batch_size_per_rank, rank, world, train=True, num_workers=config.num_workers,
        seed=seed, epoch=epoch, start_batch=start_batch, aspect_ratio_grouping=config.aspect_ratio_grouping,
    )


@dataclass
class TrainLoaders:
    """One rank's training loader of any epoch: ``loaders(epoch, start_batch)``."""

    datasets: Datasets
    config: DataConfig
    rank: int
    world: int
    seed: int

    def __call__(self, epoch: int, start_batch: int = 0) -> DataLoader:
        return train_loader(self.datasets, self.config, self.rank, self.world, self.seed, epoch, start_batch)


def val_loader(datasets: Datasets, config: DataConfig, rank: int, world: int, even: bool) -> DataLoader:
    """Every validation image once across ranks; ``even`` pads shards so ZeRO-3 ranks stay in lockstep."""
    return build_detection_loader(
        datasets.val, config.batch_size_per_rank, rank, world, train=False, num_workers=config.num_workers,
        even_eval_batches=even,
    )
