"""Specifications of agvm_ds.evaluation: COCO metrics of torchvision outputs, on one or two ranks."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from agvm_ds.data import CocoDetection, ShardedEvalSampler, make_synthetic_coco
from agvm_ds.evaluation import METRIC_NAMES, CocoEvaluator, format_coco_summary


@pytest.fixture(scope="module")
def val_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_coco(root, num_train=0, num_val=23, image_size=96, seed=1)  # odd: padded shards
    return root


def _dataset(root: Path) -> CocoDetection:
    return CocoDetection(root / "images" / "val", root / "annotations" / "instances_val.json", with_masks=True)


@pytest.fixture(scope="module")
def gt(val_root):
    ds = _dataset(val_root)
    return ds, [ds[i][1] for i in range(len(ds))]


def _perfect(target) -> dict[str, torch.Tensor]:
    n = len(target["labels"])
    return {
        "boxes": target["boxes"].as_subclass(torch.Tensor).clone(),
        "scores": torch.ones(n),
        "labels": target["labels"].clone(),
        "masks": target["masks"][:, None].float(),  # N x 1 x H x W probabilities, like torchvision
    }


def _noisy(target) -> dict[str, torch.Tensor]:
    """Deterministic imperfect predictions: boxes and masks shifted by a few pixels, mixed scores."""
    g = torch.Generator().manual_seed(target["image_id"])
    pred = _perfect(target)
    n = len(pred["scores"])
    shift = torch.randint(0, 4, (n, 1), generator=g).float()
    pred["boxes"] = pred["boxes"] + shift
    pred["scores"] = torch.rand(n, generator=g)
    for k, s in enumerate(shift.flatten().tolist()):
        pred["masks"][k] = pred["masks"][k].roll(int(s), dims=-1)
    return pred


def _evaluate(ds, targets, make_prediction, out_dir=None, iou_types=("bbox", "segm")):
    evaluator = CocoEvaluator(ds.coco, iou_types, ds.contiguous_to_category_id)
    for start in range(0, len(targets), 4):  # batches of 4, as a loader would give them
        batch = targets[start : start + 4]
        evaluator.update([make_prediction(t) for t in batch], [t["image_id"] for t in batch])
    return evaluator, evaluator.evaluate(out_dir)


def test_perfect_predictions_give_ap_one_for_boxes_and_masks(gt):
    ds, targets = gt
    _, metrics = _evaluate(ds, targets, _perfect)
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(METRIC_NAMES)
        assert metrics[iou_type]["AP"] == pytest.approx(1.0)
        assert metrics[iou_type]["AP50"] == metrics[iou_type]["AR100"] == pytest.approx(1.0)


def test_shifted_boxes_give_lower_ap(gt):
    ds, targets = gt

    def shifted(target):
        pred = _perfect(target)
        width = pred["boxes"][:, 2] - pred["boxes"][:, 0]
        pred["boxes"][:, 0::2] += 0.3 * width[:, None]
        return pred

    _, metrics = _evaluate(ds, targets, shifted, iou_types=("bbox",))
    assert 0.0 < metrics["bbox"]["AP"] < 0.6
    assert metrics["bbox"]["AP75"] < metrics["bbox"]["AP50"]


def test_empty_predictions_give_zeros_with_a_warning(gt, tmp_path):
    ds, targets = gt

    def empty(target):
        h, w = target["masks"].shape[-2:]
        return {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 1, h, w)}

    with pytest.warns(UserWarning, match="no predictions"):
        _, metrics = _evaluate(ds, targets, empty, out_dir=tmp_path)
    assert metrics == {t: {name: 0.0 for name in METRIC_NAMES} for t in ("bbox", "segm")}
    assert json.loads((tmp_path / "results_bbox.json").read_text()) == []
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_an_image_without_predictions_counts_its_objects_as_missed(gt):
    ds, targets = gt
    skipped = next(t["image_id"] for t in targets if len(t["labels"]) > 0)

    def all_but_one(target):
        pred = _perfect(target)
        if target["image_id"] == skipped:
            pred = {k: v[:0] for k, v in pred.items()}
        return pred

    _, metrics = _evaluate(ds, targets, all_but_one)
    assert 0.5 < metrics["bbox"]["AR100"] < 1.0 and metrics["segm"]["AR100"] == metrics["bbox"]["AR100"]
    assert 0.5 < metrics["bbox"]["AP"] < 1.0  # recall never reaches 1


def test_writes_coco_results_metrics_and_the_pycocotools_summary(gt, tmp_path):
    ds, targets = gt
    evaluator, metrics = _evaluate(ds, targets, _noisy, out_dir=tmp_path)
    results = json.loads((tmp_path / "results_segm.json").read_text())
    assert len(results) == sum(len(t["labels"]) for t in targets)
    assert {r["category_id"] for r in results} == {1, 3, 5, 7}  # COCO ids, not contiguous labels
    assert set(results[0]) == {"image_id", "category_id", "segmentation", "score"}
    first_box = json.loads((tmp_path / "results_bbox.json").read_text())[0]
    assert set(first_box) == {"image_id", "category_id", "bbox", "score"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert 0.2 < metrics["bbox"]["AP"] < 0.95
    for iou_type in ("bbox", "segm"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            evaluator.coco_evals[iou_type].summarize()
        table = format_coco_summary(metrics[iou_type])
        assert table == printed.getvalue().rstrip("\n") and len(table.splitlines()) == 12
        assert (tmp_path / f"metrics_{iou_type}.txt").read_text() == table + "\n"


def test_repeated_image_ids_keep_the_first_predictions_and_evaluate_consumes_them(gt):
    ds, targets = gt
    evaluator = CocoEvaluator(ds.coco, ("bbox",), ds.contiguous_to_category_id)
    evaluator.update([_perfect(t) for t in targets], [t["image_id"] for t in targets])
    evaluator.update([_noisy(t) for t in targets[:5]], [t["image_id"] for t in targets[:5]])  # padding repeats
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.warns(UserWarning, match="no predictions for 0 image"):
        assert evaluator.evaluate()["bbox"]["AP"] == 0.0


def test_masks_at_the_wrong_size_and_unknown_labels_are_rejected(gt):
    ds, targets = gt
    target = next(t for t in targets if len(t["labels"]) > 0)
    evaluator = CocoEvaluator(ds.coco, ("bbox", "segm"), ds.contiguous_to_category_id)
    pred = _perfect(target)
    pred["masks"] = pred["masks"][..., :-1]
    with pytest.raises(ValueError, match=f"masks of image {target['image_id']}"):
        evaluator.update([pred], [target["image_id"]])
    pred = _perfect(target)
    pred["labels"][0] = 9
    with pytest.raises(ValueError, match=r"labels \[9\]"):
        evaluator.update([pred], [target["image_id"]])


# ------------------------------------------------------------------------------------------------
# Two real gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate_on_rank(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        ds = _dataset(Path(root))
        evaluator = CocoEvaluator(ds.coco, ("bbox", "segm"), ds.contiguous_to_category_id)
        shard = list(ShardedEvalSampler(len(ds), rank, world_size, even=True))  # with a padded repeat
        for start in range(0, len(shard), 4):
            targets = [ds[i][1] for i in shard[start : start + 4]]
            evaluator.update([_noisy(t) for t in targets], [t["image_id"] for t in targets])
        metrics = evaluator.evaluate(Path(out) / "files" if rank == 0 else None)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters import torch: ~8 s idle, 25 s on a busy 2-core machine
def test_two_gloo_ranks_give_the_single_process_metrics(gt, val_root, tmp_path):
    ds, targets = gt
    _, single = _evaluate(ds, targets, _noisy)

    # 23 images on 2 ranks: rank 1's shard is padded with a repeat, which must not count twice
    mp.spawn(_evaluate_on_rank, args=(2, _free_port(), str(val_root), str(tmp_path)), nprocs=2, join=True)

    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1] == single
    assert 0.2 < single["segm"]["AP"] < 0.95
    assert json.loads((tmp_path / "files" / "metrics.json").read_text()) == single
    results = json.loads((tmp_path / "files" / "results_bbox.json").read_text())
    assert len(results) == sum(len(t["labels"]) for t in targets)
