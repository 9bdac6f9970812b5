"""Data for agvm-ds: COCO detection, semantic (ADE20K layout) and COCO panoptic datasets, synthetic sets of
each, v2 transforms, resumable loaders.

Typical use::

    from agvm_ds.data import CocoDetection, build_detection_loader, build_transforms, make_synthetic_coco

    paths = make_synthetic_coco("data/synthetic")          # seconds; reused when it exists
    train = CocoDetection(paths.train_images, paths.train_ann, with_masks=False,
                          transforms=build_transforms(True, "multiscale", min_size=range(192, 321, 32), max_size=427))
    loader = build_detection_loader(train, batch_size=4, rank=rank, world_size=world_size,
                                    train=True, num_workers=2, seed=0)
"""
from .coco import CocoDetection, ImageReadError, decode_segmentation
from .loader import build_detection_loader, collate_detection
from .panoptic import CocoPanoptic
from .sampler import DistributedGroupedBatchSampler, ShardedEvalSampler, aspect_ratio_group_ids
from .segmentation_transforms import build_panoptic_transforms, build_semantic_transforms
from .semantic import ADE20K_CLASSES, IGNORE_INDEX, SemanticSegmentation, ade20k, read_class_names
from .synthetic import CATEGORIES, SyntheticPaths, make_synthetic_coco
from .synthetic_segmentation import (
    SyntheticPanopticPaths,
    SyntheticSemanticPaths,
    make_synthetic_panoptic,
    make_synthetic_semantic,
)
from .transforms import COCO_MULTISCALE_SIZES, RECIPES, build_transforms

__all__ = [
    "ADE20K_CLASSES",
    "CATEGORIES",
    "COCO_MULTISCALE_SIZES",
    "CocoDetection",
    "CocoPanoptic",
    "DistributedGroupedBatchSampler",
    "IGNORE_INDEX",
    "ImageReadError",
    "RECIPES",
    "SemanticSegmentation",
    "ShardedEvalSampler",
    "SyntheticPanopticPaths",
    "SyntheticPaths",
    "SyntheticSemanticPaths",
    "ade20k",
    "aspect_ratio_group_ids",
    "build_detection_loader",
    "build_panoptic_transforms",
    "build_semantic_transforms",
    "build_transforms",
    "collate_detection",
    "decode_segmentation",
    "make_synthetic_coco",
    "make_synthetic_panoptic",
    "make_synthetic_semantic",
    "read_class_names",
]
