"""Specifications of agvm_ds.evaluation.semantic: mmseg's mIoU / mAcc / aAcc, on one to three ranks."""
from __future__ import annotations

import json
import math

import pytest
import torch
from distributed import run_ranks

from agvm_ds.data import ShardedEvalSampler
from agvm_ds.evaluation import SemanticEvaluator, format_semantic_summary

NAMES = ("road", "car", "sky")


def _same(a: dict, b: dict) -> bool:
    """Dict equality where NaN equals NaN (per-class metrics of absent classes are NaN)."""
    def norm(value):
        return {k: norm(v) for k, v in value.items()} if isinstance(value, dict) else (
            "nan" if isinstance(value, float) and math.isnan(value) else value)
    return norm(a) == norm(b)


def test_hand_built_map_with_an_ignored_pixel():
    prediction = torch.tensor([[0, 1, 1], [2, 2, 0]])
    target = torch.tensor([[0, 1, 0], [2, 255, 0]])  # the ignored pixel's prediction (2) does not count
    evaluator = SemanticEvaluator(NAMES)
    evaluator.update([prediction], [target], [7])
    metrics = evaluator.evaluate()["sem_seg"]
    # road: TP 2, FN 1 (predicted car); car: TP 1, FP 1; sky: TP 1
    expected = {
        "IoU/road": 2 / 3, "IoU/car": 1 / 2, "IoU/sky": 1.0,
        "Acc/road": 2 / 3, "Acc/car": 1.0, "Acc/sky": 1.0,
        "mIoU": (2 / 3 + 1 / 2 + 1) / 3, "mAcc": (2 / 3 + 1 + 1) / 3, "aAcc": 4 / 5,
    }
    assert metrics == pytest.approx(expected, abs=1e-12)
    assert list(metrics)[:3] == ["mIoU", "mAcc", "aAcc"]
    assert evaluator.confusion.tolist() == [[2, 1, 0], [0, 1, 0], [0, 0, 1]]  # target rows, predicted columns


def test_absent_classes_are_nan_and_left_out_of_the_means_as_in_mmseg():
    # classes: 0 and 1 labelled; 2 predicted but never labelled (IoU 0/1 = 0, Acc 0/0); 3 nowhere (both 0/0)
    evaluator = SemanticEvaluator(["a", "b", "fp_only", "absent"])
    evaluator.update([torch.tensor([[0, 1, 2, 1]])], [torch.tensor([[0, 1, 1, 1]])], [0])
    m = evaluator.evaluate()["sem_seg"]
    assert m["IoU/a"] == 1.0 and m["IoU/b"] == pytest.approx(2 / 3) and m["IoU/fp_only"] == 0.0
    assert math.isnan(m["IoU/absent"]) and math.isnan(m["Acc/absent"]) and math.isnan(m["Acc/fp_only"])
    assert m["mIoU"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["mAcc"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["aAcc"] == pytest.approx(3 / 4)


def _brute_force(predictions, targets, num_classes, ignore_index=255):
    tp, labelled, predicted = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for prediction, target in zip(predictions, targets):
        for p, t in zip(prediction.flatten().tolist(), target.flatten().tolist()):
            if t == ignore_index:
                continue
            labelled[t] += 1
            predicted[p] += 1
            tp[t] += p == t
    iou = [tp[c] / (labelled[c] + predicted[c] - tp[c]) if labelled[c] + predicted[c] else math.nan
           for c in range(num_classes)]
    acc = [tp[c] / labelled[c] if labelled[c] else math.nan for c in range(num_classes)]

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return sum(values) / len(values)

    return iou, acc, mean(iou), mean(acc), sum(tp) / sum(labelled)


def _random_maps(seed: int, count: int = 6, num_classes: int = 6):
    """Maps of varied sizes; class 4 is never a target (only predicted), class 5 appears nowhere."""
    g = torch.Generator().manual_seed(seed)
    predictions, targets = [], []
    for _ in range(count):
        h, w = (int(v) for v in torch.randint(5, 17, (2,), generator=g))
        target = torch.randint(0, 4, (h, w), generator=g)
        target[torch.rand(h, w, generator=g) < 0.1] = 255
        prediction = torch.where(torch.rand(h, w, generator=g) < 0.6, target, torch.randint(0, 5, (h, w), generator=g))
        prediction[prediction == 255] = 0
        predictions.append(prediction)
        targets.append(target.to(torch.uint8))  # label PNGs load as uint8
    return predictions, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_per_pixel_count_on_random_maps(seed):
    predictions, targets = _random_maps(seed)
    names = [f"c{i}" for i in range(6)]
    evaluator = SemanticEvaluator(names)
    for start in range(0, 6, 4):
        batch = slice(start, start + 4)
        evaluator.update(predictions[batch], targets[batch], list(range(6))[batch])
    m = evaluator.evaluate()["sem_seg"]
    iou, acc, miou, macc, aacc = _brute_force(predictions, targets, 6)
    assert m["IoU/c4"] == 0.0 and math.isnan(m["IoU/c5"]) and math.isnan(m["Acc/c4"])
    assert len(m) == 3 + 2 * 6
    for kind, values in (("IoU", iou), ("Acc", acc)):
        for name, v in zip(names, values):
            got = m[f"{kind}/{name}"]
            assert (math.isnan(v) and math.isnan(got)) or got == pytest.approx(v, abs=1e-12), (kind, name)
    assert (m["mIoU"], m["mAcc"], m["aAcc"]) == pytest.approx((miou, macc, aacc), abs=1e-12)


def test_repeated_image_ids_are_skipped_and_evaluate_consumes_the_counts():
    predictions, targets = _random_maps(3, count=2)
    evaluator = SemanticEvaluator([f"c{i}" for i in range(6)])
    evaluator.update(predictions, targets, [10, 11])
    evaluator.update([predictions[1], torch.zeros_like(predictions[0])], [targets[1], targets[0]], [11, 10])  # padding
    once = SemanticEvaluator([f"c{i}" for i in range(6)])
    once.update(predictions, targets, [10, 11])
    assert _same(evaluator.evaluate(), once.evaluate())
    with pytest.warns(UserWarning, match="no labelled pixel"):
        after = evaluator.evaluate()["sem_seg"]
    assert math.isnan(after["mIoU"]) and math.isnan(after["aAcc"])
    evaluator.update(predictions[:1], targets[:1], [10])  # a fresh evaluation counts the image again
    assert not evaluator.confusion.any() and evaluator.evaluate()["sem_seg"]["aAcc"] > 0


def test_invalid_inputs_are_rejected_naming_the_image():
    evaluator = SemanticEvaluator(NAMES)
    target = torch.zeros(4, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"image 42: prediction of shape \(4, 4\)"):
        evaluator.update([torch.zeros(4, 4, dtype=torch.int64)], [target], [42])
    bad = torch.zeros(4, 5, dtype=torch.int64)
    bad[0, 0] = 3
    with pytest.raises(ValueError, match=r"image 43: predicted labels \[3\] are outside \[0, 3\)"):
        evaluator.update([bad], [target], [43])
    ignored = torch.full((4, 5), 255)
    with pytest.raises(ValueError, match="image 44: predicted labels"):  # even where the target is ignored
        evaluator.update([bad], [ignored], [44])
    with pytest.raises(ValueError, match=r"image 45: target labels \[7\]"):
        evaluator.update([target], [target + 7], [45])
    with pytest.raises(ValueError, match="integer label maps"):
        evaluator.update([torch.zeros(4, 5)], [target], [46])
    assert not evaluator._seen  # a rejected image is not marked seen
    with pytest.raises(ValueError, match="ignore_index 1 is a class label"):
        SemanticEvaluator(NAMES, ignore_index=1)
    with pytest.raises(ValueError, match="unique"):
        SemanticEvaluator(["a", "a"])


def test_writes_per_class_json_and_formats_a_summary(tmp_path):
    evaluator = SemanticEvaluator([*NAMES, "absent"])
    evaluator.update([torch.tensor([[0, 1, 1], [2, 2, 0]])], [torch.tensor([[0, 1, 0], [2, 255, 0]])], [0])
    metrics = evaluator.evaluate(tmp_path / "eval")["sem_seg"]
    written = json.loads((tmp_path / "eval" / "semantic_per_class.json").read_text())
    assert written["mIoU"] == pytest.approx(metrics["mIoU"])
    assert written["classes"][0] == {"name": "road", "IoU": pytest.approx(2 / 3), "Acc": pytest.approx(2 / 3),
                                     "target_pixels": 3, "predicted_pixels": 2, "true_positive_pixels": 2}
    assert written["classes"][3]["IoU"] is None and written["classes"][3]["target_pixels"] == 0

    table = format_semantic_summary(metrics)
    lines = table.splitlines()
    assert lines[:2] == ["   mIoU    mAcc    aAcc", "  72.22   88.89   80.00"]
    assert "car      50.00  100.00" in table and "absent     nan     nan" in table  # few classes: all shown
    worst = format_semantic_summary(metrics, top=2).splitlines()[-2:]
    assert [line.split()[0] for line in worst] == ["car", "road"]  # lowest IoU first
    many = {"mIoU": 0.5, "mAcc": 0.5, "aAcc": 0.5, **{f"IoU/c{i}": 0.5 for i in range(30)},
            **{f"Acc/c{i}": 0.5 for i in range(30)}}
    assert len(format_semantic_summary(many).splitlines()) == 2
    assert len(format_semantic_summary(many, top=-1).splitlines()) == 2 + 3 + 30


# ------------------------------------------------------------------------------------------------
# Real gloo ranks


def _evaluate_shard(rank: int, world_size: int, out_dir: str) -> dict:
    predictions, targets = _random_maps(5)
    evaluator = SemanticEvaluator([f"c{i}" for i in range(6)])
    shard = list(ShardedEvalSampler(len(predictions), rank, world_size, even=True))
    for i in shard:  # one image per batch; padded repeats on short shards
        evaluator.update([predictions[i]], [targets[i]], [100 + i])
    return evaluator.evaluate(out_dir)


@pytest.mark.slow  # loads DeepSpeed here for the forked ranks: ~10 s
def test_the_number_of_ranks_does_not_change_the_metrics(tmp_path):
    predictions, targets = _random_maps(5)
    single = SemanticEvaluator([f"c{i}" for i in range(6)])
    single.update(predictions, targets, [100 + i for i in range(6)])
    expected = single.evaluate()
    for world_size in (1, 2, 3):  # 6 images: 6, 3 + 3 and 2 + 2 + 2 per rank
        out = tmp_path / f"world{world_size}"
        results = run_ranks(_evaluate_shard, world_size, str(out), timeout=300, start_method="fork")
        assert all(_same(result, expected) for result in results), (world_size, results, expected)
        written = json.loads((out / "semantic_per_class.json").read_text())
        assert written["aAcc"] == expected["sem_seg"]["aAcc"]
