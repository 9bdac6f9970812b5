"""Datasets and loaders of an experiment, from its ``data`` section."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..data import CocoDetection, build_detection_loader, build_transforms, make_synthetic_coco
from ..data.panoptic import CocoPanoptic
from ..data.segmentation_transforms import build_panoptic_transforms, build_semantic_transforms
from ..data.semantic import ADE20K_CLASSES, SemanticSegmentation, read_class_names
from ..data.synthetic_segmentation import make_synthetic_panoptic, make_synthetic_semantic
from ..seeding import sample_seed
from .config import DataConfig

__all__ = ["Datasets", "SeededSamples", "TrainLoaders", "build_datasets", "split_sources", "train_loader", "val_loader"]


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
    """Both splits of an experiment, for the model's ``task`` (``ModelSpec.task``)."""

    train: SeededSamples
    val: Any  # CocoDetection, SemanticSegmentation or CocoPanoptic
    task: str

    @property
    def num_classes(self) -> int:
        """The class count the model's classifier is sized from: categories (detection), classes
        (semantic), thing categories (panoptic)."""
        return self.val.num_things if self.task == "panoptic" else self.val.num_classes

    @property
    def num_stuff(self) -> int:
        """Stuff categories of a panoptic data set; 0 for the other tasks."""
        return self.val.num_stuff if self.task == "panoptic" else 0


def build_datasets(config: DataConfig, task: str, seed: int, is_main: bool, barrier: Callable[[], None],
                   with_masks: bool = False) -> Datasets:
    """Builds both splits for ``task``; a synthetic set is generated once, by the main rank, before the
    others read it. ``with_masks``: detection data decodes instance masks (Mask R-CNN)."""
    if config.dataset == "synthetic" and is_main:
        _synthetic(config, task)
    barrier()
    train_source, val_source = split_sources(config, task)
    train = build_split(config, task, train_source, train=True, with_masks=with_masks)
    val = build_split(config, task, val_source, train=False, with_masks=with_masks)
    return Datasets(SeededSamples(train, seed), val, task)


def build_split(config: DataConfig, task: str, source: tuple[Any, ...], train: bool, with_masks: bool = False) -> Any:
    """One split's dataset for ``task`` from ``source`` (see :func:`split_sources`), with the recipe's
    training transforms or the evaluation ones (the model resizes evaluation images itself)."""
    if task == "semantic":
        transforms = build_semantic_transforms(
            train, scale=(config.max_size, max(config.scales)), ratio_range=tuple(config.resize_ratio),
            crop_size=config.crop_size, cat_max_ratio=config.cat_max_ratio)
        images, labels, classes = source
        if classes == ADE20K_CLASSES:
            return SemanticSegmentation(images, labels, classes, transforms, reduce_zero_label=True)
        return SemanticSegmentation(images, labels, read_class_names(classes), transforms)
    recipe = dict(recipe=config.recipe, min_size=config.scales, max_size=config.max_size, lsj_size=config.lsj_size)
    if task == "panoptic":
        return CocoPanoptic(*source, transforms=build_panoptic_transforms(train, **recipe))
    return CocoDetection(*source[:2], build_transforms(train, **recipe), with_masks=with_masks, remove_empty=train)


def split_sources(config: DataConfig, task: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """What each split is read from, for ``task``: (images, annotation file, PNG folder or None) for
    detection and panoptic data; (images, label folder, class list file or ``ADE20K_CLASSES``) for semantic
    data. The synthetic set is generated if missing."""
    if config.dataset == "synthetic":
        paths = _synthetic(config, task)
        if task == "semantic":
            return ((paths.train_images, paths.train_labels, paths.classes_file),
                    (paths.val_images, paths.val_labels, paths.classes_file))
        if task == "panoptic":
            return ((paths.train_images, paths.train_ann, paths.train_masks),
                    (paths.val_images, paths.val_ann, paths.val_masks))
        return (paths.train_images, paths.train_ann, None), (paths.val_images, paths.val_ann, None)
    if config.dataset == "ade20k":
        root = Path(config.root)
        return tuple((root / "images" / split, root / "annotations" / split, ADE20K_CLASSES)
                     for split in ("training", "validation"))
    if config.dataset == "semantic_folder":
        return ((config.train_images, config.train_masks, config.classes),
                (config.val_images, config.val_masks, config.classes))
    return ((config.train_images, config.train_ann, config.train_masks),
            (config.val_images, config.val_ann, config.val_masks))


def _synthetic(config: DataConfig, task: str) -> Any:
    """The synthetic set of ``config`` for ``task`` (reused when its stamp matches, generated otherwise)."""
    sizes = (config.synthetic_train, config.synthetic_val, config.synthetic_size)
    if task == "semantic":
        return make_synthetic_semantic(Path(config.root) / "semantic", *sizes, seed=0)
    if task == "panoptic":
        return make_synthetic_panoptic(Path(config.root) / "panoptic", *sizes, seed=0)
    return make_synthetic_coco(config.root, *sizes, seed=0)


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
