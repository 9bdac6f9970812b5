"""Semantic segmentation metrics (mIoU, mAcc, aAcc) of label maps, summed across ranks.

The definitions are mmsegmentation's (``IoUMetric``), so that numbers compare with published
ADE20K results: intersections and unions are summed over the whole data set before dividing
(not a mean of per-image IoUs), pixels whose target is ``ignore_index`` do not count, and a class
whose IoU or accuracy is 0/0 gets NaN and is left out of the means (``np.nanmean``).

Everything needed is one ``num_classes x num_classes`` confusion matrix of pixel counts (rows:
target class, columns: predicted class). Each rank accumulates its own; :meth:`evaluate` sums
them with one all-reduce, so every rank computes the same metrics from the same integers.

File written by :meth:`SemanticEvaluator.evaluate` when given ``out_dir`` (rank 0 only):
``semantic_per_class.json`` (per class IoU, Acc and pixel counts, NaN written as ``null``).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["SemanticEvaluator", "format_semantic_summary"]

#: Above this many classes, ``format_semantic_summary(metrics)`` leaves the per-class table out.
_MAX_CLASSES_SHOWN_BY_DEFAULT = 20


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks, on the CPU (a copy; no-op without a group).

    NCCL only reduces CUDA tensors, so under an NCCL default group the tensor goes through the
    current CUDA device; gloo (and mixed ``cpu:gloo,cuda:nccl`` groups) reduce CPU tensors.
    """
    tensor = tensor.detach().clone()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor.cpu()
    if dist.get_backend() == "nccl":
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu()


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


class SemanticEvaluator:
    """Accumulates a data set's confusion matrix from per-image label maps, then computes mIoU.

    Args:
        class_names: one name per class, in label order (label ``i`` is ``class_names[i]``).
        ignore_index: target value of unlabelled pixels (mmseg and ADE20K: 255); must not be a
            class label.

    Use: ``update()`` after every batch on every rank, then ``evaluate()`` once on every rank
    (a collective when a process group is initialized). ``evaluate()`` consumes what was
    accumulated, so the same evaluator serves the next evaluation; the summed matrix of the last
    one stays in :attr:`confusion`.
    """

    def __init__(self, class_names: Sequence[str], ignore_index: int = 255) -> None:
        names = [str(name) for name in class_names]
        if not names:
            raise ValueError("class_names is empty")
        if len(set(names)) != len(names):
            duplicated = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"class names must be unique (they name the metrics), repeated: {duplicated}")
        if 0 <= ignore_index < len(names):
            raise ValueError(f"ignore_index {ignore_index} is a class label (there are {len(names)} classes)")
        self.class_names: tuple[str, ...] = tuple(names)
        self.num_classes = len(names)
        self.ignore_index = int(ignore_index)
        #: The all-reduced confusion matrix (target x prediction) of the last ``evaluate()``.
        self.confusion: torch.Tensor | None = None
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self._seen: set[int] = set()

    def reset(self) -> None:
        """Forget the pixels and image ids accumulated so far."""
        self._confusion.zero_()
        self._seen = set()

    def update(
        self,
        predictions: Sequence[torch.Tensor],
        targets: Sequence[torch.Tensor],
        image_ids: Sequence[int | torch.Tensor],
    ) -> None:
        """Add one batch of (H, W) predicted labels (argmax) and target labels of the same size.

        An image id seen before (a padded repeat of the evaluation sampler) is skipped, so padding
        never counts twice. Predictions are taken at the target's size: resize logits before the
        argmax, as mmseg does.
        """
        if not len(predictions) == len(targets) == len(image_ids):
            raise ValueError(
                f"got {len(predictions)} predictions, {len(targets)} targets and {len(image_ids)} image ids"
            )
        for prediction, target, image_id in zip(predictions, targets, image_ids):
            image_id = int(image_id)
            if image_id in self._seen:
                continue
            self._confusion += self._image_confusion(prediction, target, image_id)
            self._seen.add(image_id)

    def _image_confusion(self, prediction: torch.Tensor, target: torch.Tensor, image_id: int) -> torch.Tensor:
        prediction, target = torch.as_tensor(prediction), torch.as_tensor(target)
        if prediction.shape != target.shape:
            raise ValueError(
                f"image {image_id}: prediction of shape {tuple(prediction.shape)} and target of shape "
                f"{tuple(target.shape)} differ (compare at the target's size)"
            )
        if prediction.is_floating_point() or target.is_floating_point():
            raise ValueError(f"image {image_id}: expected integer label maps (argmax of the logits), got "
                             f"{prediction.dtype} prediction and {target.dtype} target")
        c = self.num_classes
        prediction = prediction.detach().flatten().long()
        target = target.detach().to(prediction.device).flatten().long()
        labelled = target != self.ignore_index
        bad_prediction = ((prediction < 0) | (prediction >= c)).any()  # on every pixel: a model bug anywhere
        bad_target = ((target < 0) | (target >= c))[labelled].any()
        if bool(bad_prediction | bad_target):  # one host read per image in the common case
            self._raise_out_of_range(prediction, target[labelled], image_id)
        counts = torch.bincount(target[labelled] * c + prediction[labelled], minlength=c * c)
        return counts.view(c, c).cpu()

    def _raise_out_of_range(self, prediction: torch.Tensor, target: torch.Tensor, image_id: int) -> None:
        c = self.num_classes
        if ((prediction < 0) | (prediction >= c)).any():
            values = torch.unique(prediction[(prediction < 0) | (prediction >= c)])[:10].tolist()
            raise ValueError(f"image {image_id}: predicted labels {values} are outside [0, {c})")
        values = torch.unique(target[(target < 0) | (target >= c)])[:10].tolist()
        raise ValueError(
            f"image {image_id}: target labels {values} are neither in [0, {c}) nor ignore_index {self.ignore_index}"
        )

    def evaluate(self, out_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
        """Sum the confusion matrices of all ranks and return the metrics, identical on every rank.

        Returns ``{"sem_seg": {"mIoU", "mAcc", "aAcc", "IoU/<class>", .., "Acc/<class>", ..}}`` as
        fractions in [0, 1]: ``IoU = TP / (TP + FP + FN)``, ``Acc = TP / (TP + FN)``, ``aAcc`` =
        correctly labelled pixels / labelled pixels. A class without target pixels has NaN
        ``Acc`` and, unless it was predicted (then ``IoU`` = 0), NaN ``IoU``; NaNs are left out
        of the means. With nothing labelled at all, the means are NaN and a warning says so.
        """
        confusion = _all_reduce_sum(self._confusion)
        self.reset()
        self.confusion = confusion
        metrics, per_class = _metrics(confusion.numpy(), self.class_names)
        if not confusion.any():
            warnings.warn("semantic segmentation evaluation: no labelled pixel; all metrics are NaN", stacklevel=2)
        if out_dir is not None and _is_rank0():
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            summary = {k: _json_number(metrics[k]) for k in ("mIoU", "mAcc", "aAcc")}
            (out / "semantic_per_class.json").write_text(json.dumps({**summary, "classes": per_class}, indent=2))
        return {"sem_seg": metrics}


def _metrics(confusion: np.ndarray, class_names: Sequence[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """mmseg's metrics from a (target x prediction) confusion matrix, and the per-class records."""
    confusion = confusion.astype(np.float64)
    tp = np.diag(confusion)
    target_pixels = confusion.sum(axis=1)
    predicted_pixels = confusion.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 -> NaN, as in mmseg
        iou = tp / (target_pixels + predicted_pixels - tp)
        acc = tp / target_pixels
        a_acc = tp.sum() / target_pixels.sum()
    metrics = {"mIoU": _nanmean(iou), "mAcc": _nanmean(acc), "aAcc": float(a_acc)}
    metrics.update({f"IoU/{name}": float(v) for name, v in zip(class_names, iou)})
    metrics.update({f"Acc/{name}": float(v) for name, v in zip(class_names, acc)})
    per_class = [
        {
            "name": name,
            "IoU": _json_number(float(iou[i])),
            "Acc": _json_number(float(acc[i])),
            "target_pixels": int(target_pixels[i]),
            "predicted_pixels": int(predicted_pixels[i]),
            "true_positive_pixels": int(tp[i]),
        }
        for i, name in enumerate(class_names)
    ]
    return metrics, per_class


def _nanmean(values: np.ndarray) -> float:
    """``np.nanmean`` without its all-NaN RuntimeWarning (evaluate warns once itself)."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def format_semantic_summary(metrics: Mapping[str, float], top: int = 0) -> str:
    """mIoU / mAcc / aAcc in percent, then a per-class IoU / Acc table (as mmseg logs it).

    Args:
        metrics: the ``"sem_seg"`` dict returned by :meth:`SemanticEvaluator.evaluate`.
        top: how many classes the per-class table shows, lowest IoU first (the ones worth looking
            at in a 150-class data set); 0 shows every class when there are at most 20 and no
            table otherwise; a negative value shows every class.
    """
    lines = [f"{'mIoU':>7} {'mAcc':>7} {'aAcc':>7}", " ".join(_percent(metrics[k]) for k in ("mIoU", "mAcc", "aAcc"))]
    names = [key[len("IoU/"):] for key in metrics if key.startswith("IoU/")]
    if top == 0:
        shown = names if len(names) <= _MAX_CLASSES_SHOWN_BY_DEFAULT else []
    else:
        def sort_key(name: str) -> tuple[bool, float]:
            iou = metrics[f"IoU/{name}"]
            return math.isnan(iou), iou  # NaN (no pixels) last

        shown = sorted(names, key=sort_key)
        shown = shown[:top] if top > 0 else names
    if shown:
        width = max(5, *(len(name) for name in shown))
        lines += ["", f"{'class':<{width}} {'IoU':>7} {'Acc':>7}", "-" * (width + 16)]
        lines += [f"{name:<{width}} {_percent(metrics[f'IoU/{name}'])} {_percent(metrics[f'Acc/{name}'])}"
                  for name in shown]
    return "\n".join(lines)


def _percent(value: float) -> str:
    return f"{'nan':>7}" if math.isnan(value) else f"{100 * value:7.2f}"
