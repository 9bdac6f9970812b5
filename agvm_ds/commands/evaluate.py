"""``agvm-eval``: the metrics of a run's checkpoint (COCO AP, mIoU or PQ), on its validation set or another set.

    agvm-eval RUN_DIR [--checkpoint TAG] [--ann FILE --images DIR] [--out DIR]

One process evaluates any checkpoint, whatever ZeRO stage and number of ranks wrote it: the
checkpoint's fp32 weights are consolidated (as ``agvm-export`` does) into the plain torchvision
model, in fp32. Images are batched exactly as the run's own evaluation batched them (its
``data.batch_size_per_rank``, sharded over the ranks that wrote the checkpoint): torchvision pads
a batch to its largest image, and padding changes detections slightly, so this makes the metrics of
an fp32 run equal to the ones it logged itself. A run trained in bf16/fp16 logged metrics of
low-precision inference; these are fp32's.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from ..data import build_detection_loader
from ..engine.evaluators import build_evaluator, format_metrics
from ..engine.loaders import build_split, split_sources
from ..engine.model_spec import trains_masks
from ..engine.trained_run import TrainedRun, command_parser, trained_detector
from ..errors import add_exit_codes, run_command

__all__ = ["evaluate_run", "main"]


@torch.no_grad()
def evaluate_run(run_dir: Union[str, Path], tag: Optional[str] = None, ann: Optional[str] = None,
                 images: Optional[str] = None,
                 out_dir: Optional[Union[str, Path]] = None) -> dict[str, dict[str, float]]:
    """The task's metrics of checkpoint ``tag`` (default: the newest complete one): COCO
    ``{iou_type: {"AP": ..., ...}}``, ``{"sem_seg": {"mIoU": ...}}`` or ``{"panoptic": {"PQ": ...}}``.

    Writes the evaluator's files (COCO results and ``metrics.json``, per-class tables) under ``out_dir``
    (default: ``RUN_DIR/eval_<tag>``).
    """
    run = TrainedRun.open(run_dir, tag)
    task = run.spec.task
    iou_types = ("bbox", "segm") if trains_masks(run.config, run.spec) else ("bbox",)
    dataset = _dataset(run, images, ann, with_masks="segm" in iou_types)
    model = trained_detector(run)
    evaluator = build_evaluator(task, dataset, iou_types)
    world, data = run.checkpoint.world_size, run.config.data
    for rank in range(world):  # the batches each rank of the run evaluated
        loader = build_detection_loader(dataset, data.batch_size_per_rank, rank, world, train=False,
                                        num_workers=data.num_workers)
        for batch, targets in loader:
            evaluator.update(model(batch), targets)
    return evaluator.evaluate(out_dir if out_dir is not None else run.run_dir / f"eval_{run.checkpoint.tag}")


def _dataset(run: TrainedRun, images: Optional[str], ann: Optional[str], with_masks: bool) -> Any:
    """The run's validation split, or another set of the same format whose classes are the model's."""
    if (images is None) != (ann is None):
        raise ValueError("give both --images and --ann (another set of the run's format), or neither "
                         "(the run's validation set)")
    task = run.spec.task
    _, source = split_sources(run.config.data, task)
    if ann is not None:
        source = (images, ann, source[2] if task == "semantic" else None)
    dataset = build_split(run.config.data, task, source, train=False, with_masks=with_masks)
    if task == "semantic":
        found, trained = list(dataset.classes), [c["name"] for c in run.categories]
        what = "classes"
    elif task == "panoptic":
        found, trained = [c["id"] for c in dataset.categories], [c["id"] for c in run.categories]
        what = "category ids"
    else:
        found, trained = sorted(dataset.contiguous_to_category_id.values()), [c["id"] for c in run.categories]
        what = "category ids"
    if found != trained:
        raise ValueError(f"{source[1]}: {what} {found}, but the model was trained on {trained}")
    return dataset


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_exit_codes(command_parser("agvm-eval", __doc__))
    parser.add_argument("--ann", help="annotation file of another set of the run's format (with --images): a COCO "
                        "instances or panoptic JSON, or a folder of label PNGs (semantic)")
    parser.add_argument("--images", help="image folder of that set")
    parser.add_argument("--out", help="where results and metrics go (default: RUN_DIR/eval_<tag>)")
    args = parser.parse_args(argv)

    def run() -> int:
        print(format_metrics(evaluate_run(args.run_dir, args.checkpoint, args.ann, args.images, args.out)))
        return 0

    return run_command("agvm-eval", run)


if __name__ == "__main__":
    sys.exit(main())
