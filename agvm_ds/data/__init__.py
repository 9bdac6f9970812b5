"""Data for agvm-ds: COCO-format datasets, a synthetic COCO set, v2 transforms, resumable loaders.

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
from .sampler import DistributedGroupedBatchSampler, ShardedEvalSampler, aspect_ratio_group_ids
from .synthetic import CATEGORIES, SyntheticPaths, make_synthetic_coco
from .transforms import COCO_MULTISCALE_SIZES, RECIPES, build_transforms

__all__ = [
    "CATEGORIES",
    "COCO_MULTISCALE_SIZES",
    "CocoDetection",
    "DistributedGroupedBatchSampler",
    "ImageReadError",
    "RECIPES",
    "ShardedEvalSampler",
    "SyntheticPaths",
    "aspect_ratio_group_ids",
    "build_detection_loader",
    "build_transforms",
    "collate_detection",
    "decode_segmentation",
    "make_synthetic_coco",
]
