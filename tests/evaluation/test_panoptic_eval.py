"""Specifications of agvm_ds.evaluation.panoptic: panopticapi's PQ / SQ / RQ, on one or two ranks."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from distributed import run_ranks

from agvm_ds.data import ShardedEvalSampler
from agvm_ds.evaluation import PanopticEvaluator, format_panoptic_summary

PERSON, CAR, SKY, GRASS = 1, 2, 10, 11
CATEGORIES = [
    {"id": PERSON, "name": "person", "isthing": 1},
    {"id": CAR, "name": "car", "isthing": 1},
    {"id": SKY, "name": "sky", "isthing": 0},
    {"id": GRASS, "name": "grass", "isthing": 0},
]
WIDTH = 200


def _row(*runs: tuple[int, int, int]) -> np.ndarray:
    """A (1, 200) segment-id map: each run (start, stop, id) paints [start, stop); the rest is VOID (0)."""
    ids = np.zeros((1, WIDTH), dtype=np.int64)
    for start, stop, segment in runs:
        ids[0, start:stop] = segment
    return ids


def _pred(ids: np.ndarray, categories: dict[int, int]):
    return ids, [{"id": i, "category_id": c} for i, c in categories.items()]


def _gt(ids: np.ndarray, categories: dict[int, int], crowd: tuple[int, ...] = ()):
    return ids, [{"id": i, "category_id": c, "iscrowd": int(i in crowd)} for i, c in categories.items()]


def _evaluate(prediction, ground_truth):
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update([prediction], [ground_truth], [1])
    metrics = evaluator.evaluate()["panoptic"]
    counts = {c["name"]: tuple(int(v) for v in row[:3]) for c, row in zip(CATEGORIES, evaluator.stats)}
    return metrics, counts, evaluator.stats


# ground truth used by most cases: person on [0, 100), sky on [100, 200)
GT = _gt(_row((0, 100, 1), (100, 200, 2)), {1: PERSON, 2: SKY})


def test_a_perfect_prediction_scores_one():
    metrics, counts, _ = _evaluate(_pred(_row((0, 100, 7), (100, 200, 8)), {7: PERSON, 8: SKY}), GT)
    assert counts == {"person": (1, 0, 0), "car": (0, 0, 0), "sky": (1, 0, 0), "grass": (0, 0, 0)}
    for name in ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st"):
        assert metrics[name] == 1.0
    assert (metrics["N"], metrics["N_th"], metrics["N_st"]) == (2, 1, 1)
    assert metrics["PQ/person"] == 1.0 and math.isnan(metrics["PQ/car"])  # car: nothing to judge


def test_iou_just_above_one_half_matches():
    # person [0, 51): IoU 51/100; sky [51, 200): IoU 100/149
    metrics, counts, stats = _evaluate(_pred(_row((0, 51, 7), (51, 200, 8)), {7: PERSON, 8: SKY}), GT)
    assert counts["person"] == (1, 0, 0) and counts["sky"] == (1, 0, 0)
    assert stats[0, 3] == pytest.approx(0.51, abs=1e-15)
    assert metrics["PQ_th"] == pytest.approx(0.51, abs=1e-15) and metrics["PQ_st"] == pytest.approx(100 / 149)
    assert metrics["PQ"] == pytest.approx((0.51 + 100 / 149) / 2, abs=1e-15)
    assert metrics["RQ"] == 1.0 and metrics["SQ"] == metrics["PQ"]


def test_iou_of_exactly_one_half_does_not_match():
    # person [0, 50): IoU 50/100, not > 0.5: one fn and one fp; sky [50, 200): IoU 100/150
    metrics, counts, _ = _evaluate(_pred(_row((0, 50, 7), (50, 200, 8)), {7: PERSON, 8: SKY}), GT)
    assert counts["person"] == (0, 1, 1) and counts["sky"] == (1, 0, 0)
    assert (metrics["PQ_th"], metrics["SQ_th"], metrics["RQ_th"]) == (0.0, 0.0, 0.0)
    assert metrics["PQ_st"] == pytest.approx(2 / 3)
    assert metrics["PQ"] == pytest.approx(1 / 3) and metrics["RQ"] == pytest.approx(0.5)


def test_an_unmatched_prediction_is_a_false_positive_and_a_missed_segment_a_false_negative():
    # a car predicted inside the sky; the annotated car [180, 200) predicted as sky
    gt = _gt(_row((0, 100, 1), (100, 180, 2), (180, 200, 3)), {1: PERSON, 2: SKY, 3: CAR})
    prediction = _pred(_row((0, 100, 7), (100, 110, 9), (110, 200, 8)), {7: PERSON, 8: SKY, 9: CAR})
    metrics, counts, _ = _evaluate(prediction, gt)
    assert counts == {"person": (1, 0, 0), "car": (0, 1, 1), "sky": (1, 0, 0), "grass": (0, 0, 0)}
    sky_iou = 70 / 100  # [110, 180) of predicted [110, 200) and annotated [100, 180)
    assert metrics["PQ/car"] == 0.0 and metrics["PQ/sky"] == pytest.approx(sky_iou)
    assert metrics["PQ_th"] == pytest.approx(0.5) and metrics["RQ_th"] == pytest.approx(0.5)
    assert metrics["PQ"] == pytest.approx((1 + 0 + sky_iou) / 3)
    only_fn = _evaluate(_pred(_row((0, 100, 7), (100, 200, 8)), {7: PERSON, 8: SKY}), gt)[1]
    assert only_fn["car"] == (0, 0, 1)


def test_void_pixels_leave_the_iou_and_a_prediction_mostly_on_void_is_not_judged():
    # ground truth: person [0, 50), VOID [50, 100), sky [100, 200)
    gt = _gt(_row((0, 50, 1), (100, 200, 2)), {1: PERSON, 2: SKY})
    # person predicted on [0, 90): 40 pixels on VOID do not count: IoU 50 / (90 + 50 - 50 - 40) = 1
    metrics, counts, stats = _evaluate(_pred(_row((0, 90, 7), (90, 100, 9), (100, 200, 8)),
                                             {7: PERSON, 8: SKY, 9: CAR}), gt)
    assert counts["person"] == (1, 0, 0) and stats[0, 3] == 1.0
    assert counts["car"] == (0, 0, 0)  # the car, all on VOID, is neither tp nor fp
    # a car with 45 of its 90 pixels on VOID: exactly half, so judged: fp
    counts = _evaluate(_pred(_row((0, 50, 7), (55, 145, 9), (145, 200, 8)), {7: PERSON, 8: SKY, 9: CAR}), gt)[1]
    assert counts["car"] == (0, 1, 0)
    # 46 of 90 on VOID: not judged
    counts = _evaluate(_pred(_row((0, 50, 7), (54, 144, 9), (144, 200, 8)), {7: PERSON, 8: SKY, 9: CAR}), gt)[1]
    assert counts["car"] == (0, 0, 0)


def test_crowd_regions_are_neither_false_negatives_nor_hosts_of_false_positives_of_their_category():
    # ground truth: a person crowd on [0, 60), a person on [60, 100), sky on [100, 200)
    gt = _gt(_row((0, 60, 1), (60, 100, 4), (100, 200, 2)), {1: PERSON, 4: PERSON, 2: SKY}, crowd=(1,))
    # person predicted over the crowd (never matched, not an fp), the single person and the sky
    prediction = _pred(_row((0, 60, 7), (60, 100, 5), (100, 200, 8)), {7: PERSON, 5: PERSON, 8: SKY})
    metrics, counts, _ = _evaluate(prediction, gt)
    assert counts["person"] == (1, 0, 0) and metrics["PQ/person"] == 1.0
    # one person over [0, 100): IoU 40/100 with the single person, so a miss; 60 % on the crowd: not judged
    counts = _evaluate(_pred(_row((0, 100, 5), (100, 200, 8)), {5: PERSON, 8: SKY}), gt)[1]
    assert counts["person"] == (0, 0, 1)  # the crowd is not a miss either
    # one person over [20, 100): IoU 40/80, a miss; exactly half on the crowd: judged, a false positive
    counts = _evaluate(_pred(_row((20, 100, 5), (100, 200, 8)), {5: PERSON, 8: SKY}), gt)[1]
    assert counts["person"] == (0, 1, 1)
    # a car on the person crowd is judged: a false positive
    counts = _evaluate(_pred(_row((0, 60, 9), (60, 100, 5), (100, 200, 8)), {9: CAR, 5: PERSON, 8: SKY}), gt)[1]
    assert counts["car"] == (0, 1, 0) and counts["person"] == (1, 0, 0)


def test_things_and_stuff_are_averaged_separately():
    gt = _gt(_row((0, 50, 1), (50, 100, 3), (100, 150, 2), (150, 200, 6)), {1: PERSON, 3: CAR, 2: SKY, 6: GRASS})
    # person and sky perfect; the car missed (half VOID, half grass); grass over [75, 100) too: IoU 50/75
    prediction = _pred(_row((0, 50, 7), (100, 150, 8), (75, 100, 9), (150, 200, 9)), {7: PERSON, 8: SKY, 9: GRASS})
    metrics, counts, _ = _evaluate(prediction, gt)
    assert counts == {"person": (1, 0, 0), "car": (0, 0, 1), "sky": (1, 0, 0), "grass": (1, 0, 0)}
    assert (metrics["PQ_th"], metrics["SQ_th"], metrics["RQ_th"]) == (0.5, 0.5, 0.5)  # SQ of car: 0
    assert [metrics["PQ_st"], metrics["SQ_st"], metrics["RQ_st"]] == pytest.approx([5 / 6, 5 / 6, 1.0])
    assert metrics["PQ"] == pytest.approx((1 + 0 + 1 + 2 / 3) / 4)
    assert (metrics["N"], metrics["N_th"], metrics["N_st"]) == (4, 2, 2)


def test_invalid_inputs_are_rejected_naming_the_image():
    evaluator = PanopticEvaluator(CATEGORIES)
    ids = _row((0, 100, 7))
    with pytest.raises(ValueError, match="image 5: predicted segment 7 has unknown category_id 99"):
        evaluator.update([_pred(ids, {7: 99})], [GT], [5])
    with pytest.raises(ValueError, match=r"image 6: predicted segment ids \[7\] are in the map but not"):
        evaluator.update([_pred(ids, {})], [GT], [6])
    with pytest.raises(ValueError, match=r"image 7: predicted segment ids \[8\] are in segments_info but not"):
        evaluator.update([_pred(ids, {7: PERSON, 8: SKY})], [GT], [7])
    with pytest.raises(ValueError, match="image 8: predicted map of shape"):
        evaluator.update([_pred(ids[:, :-1], {7: PERSON})], [GT], [8])
    assert not evaluator._seen


def test_repeated_image_ids_are_skipped_and_tensors_are_accepted(tmp_path):
    evaluator = PanopticEvaluator(CATEGORIES)
    good = _pred(torch.from_numpy(_row((0, 100, 7), (100, 200, 8))), {7: PERSON, 8: SKY})
    bad = _pred(_row((0, 200, 8)), {8: SKY})
    evaluator.update([good, bad], [(torch.from_numpy(GT[0]), GT[1]), GT], [3, 3])  # the repeat is ignored
    metrics = evaluator.evaluate(tmp_path)["panoptic"]
    assert metrics["PQ"] == 1.0
    written = json.loads((tmp_path / "panoptic_per_class.json").read_text())
    assert written["PQ"] == 1.0 and written["N"] == 2
    assert written["categories"][0] | {"iou_sum": 1.0} == {
        "id": PERSON, "name": "person", "isthing": True, "counted": True, "PQ": 1.0, "SQ": 1.0, "RQ": 1.0,
        "tp": 1, "fp": 0, "fn": 0, "iou_sum": 1.0}
    assert written["categories"][1]["PQ"] is None
    with pytest.warns(UserWarning, match="no segment"):
        assert math.isnan(evaluator.evaluate()["panoptic"]["PQ"])  # evaluate consumed the counts


def test_summary_is_panopticapis_table():
    metrics, _, _ = _evaluate(_pred(_row((0, 50, 7), (50, 200, 8)), {7: PERSON, 8: SKY}), GT)
    assert format_panoptic_summary(metrics).splitlines() == [
        "          |    PQ     SQ     RQ     N",
        "--------------------------------------",
        "All       |  33.3   33.3   50.0     2",
        "Things    |   0.0    0.0    0.0     1",
        "Stuff     |  66.7   66.7  100.0     1",
    ]


# ------------------------------------------------------------------------------------------------
# Cross-check with torchmetrics on random crowd-free, VOID-free images


def _random_image(rng: np.random.Generator, size: int = 12, block: int = 2):
    """Blocky ground truth and a perturbed prediction, both covering every pixel (no VOID).

    Stuff categories get at most one segment per image (torchmetrics merges a stuff category's
    segments into one), things any number.
    """
    cells = size // block

    def segmentation(num_segments: int):
        stuff = list(rng.permutation([SKY, GRASS]))
        categories = {}
        for segment in range(1, num_segments + 1):
            categories[segment] = stuff.pop() if stuff and rng.random() < 0.4 else int(rng.choice([PERSON, CAR]))
        cells_ids = rng.integers(1, num_segments + 1, (cells, cells))
        return cells_ids, categories

    gt_cells, gt_categories = segmentation(int(rng.integers(2, 7)))
    pred_cells = gt_cells.copy()
    pred_categories = dict(gt_categories)
    flip = rng.random(pred_cells.shape) < 0.25
    extra = int(gt_cells.max()) + 1
    pred_cells[flip] = rng.integers(1, extra + 1, int(flip.sum()))
    pred_categories[extra] = int(rng.choice([PERSON, CAR]))
    for segment in pred_categories:  # occasionally the wrong category, stuff staying unique
        if rng.random() < 0.15 and pred_categories[segment] in (PERSON, CAR):
            pred_categories[segment] = PERSON + CAR - pred_categories[segment]
    expand = np.ones((block, block), dtype=np.int64)
    gt_ids, pred_ids = np.kron(gt_cells, expand), np.kron(pred_cells, expand) * 3 + 5  # unrelated id values
    pred_categories = {i * 3 + 5: c for i, c in pred_categories.items() if i * 3 + 5 in pred_ids}
    gt_categories = {i: c for i, c in gt_categories.items() if i in gt_ids}
    return _pred(pred_ids, pred_categories), _gt(gt_ids, gt_categories)


def _category_instance(ids: np.ndarray, categories: dict[int, int]) -> torch.Tensor:
    """torchmetrics' (H, W, 2) (category id, instance id) form of a segment-id map."""
    lookup = np.vectorize(categories.__getitem__)
    return torch.from_numpy(np.stack([lookup(ids), ids], axis=-1))


def test_agrees_with_torchmetrics_on_crowd_free_void_free_images():
    from torchmetrics.detection import PanopticQuality

    rng = np.random.default_rng(0)
    images = [_random_image(rng) for _ in range(40)]
    evaluator = PanopticEvaluator(CATEGORIES)
    evaluator.update([p for p, _ in images], [g for _, g in images], list(range(len(images))))
    metrics = evaluator.evaluate()["panoptic"]

    def as_tensor(ids, info):
        return _category_instance(ids, {s["id"]: s["category_id"] for s in info})

    preds = torch.stack([as_tensor(*p) for p, _ in images])
    target = torch.stack([as_tensor(*g) for _, g in images])
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # torchmetrics divides areas in the default dtype
    try:
        reference = PanopticQuality(things={PERSON, CAR}, stuffs={SKY, GRASS}, return_sq_and_rq=True,
                                    return_per_class=True)
        per_class = reference(preds, target)  # (categories, 3): things then stuffs, by id
        overall = PanopticQuality(things={PERSON, CAR}, stuffs={SKY, GRASS}, return_sq_and_rq=True)(preds, target)
    finally:
        torch.set_default_dtype(default_dtype)

    stats = evaluator.stats  # rows in CATEGORIES order, which is torchmetrics' order here
    assert stats[:, 0].tolist() == reference.true_positives.tolist()
    assert stats[:, 1].tolist() == reference.false_positives.tolist()
    assert stats[:, 2].tolist() == reference.false_negatives.tolist()
    assert stats[:, 0].min() > 0 and stats[:, 1].sum() > 0 and stats[:, 2].sum() > 0  # a non-trivial check
    assert stats[:, 3].tolist() == pytest.approx(reference.iou_sum.tolist(), abs=1e-9)
    for c, (pq, _, _) in zip(CATEGORIES, per_class.tolist()):
        assert metrics[f"PQ/{c['name']}"] == pytest.approx(pq, abs=1e-9)
    assert [metrics["PQ"], metrics["SQ"], metrics["RQ"]] == pytest.approx(overall.tolist(), abs=1e-9)
    assert 0.2 < metrics["PQ"] < 0.9


# ------------------------------------------------------------------------------------------------
# Real gloo ranks


def _evaluate_shard(rank: int, world_size: int) -> dict:
    rng = np.random.default_rng(1)
    images = [_random_image(rng) for _ in range(5)]
    evaluator = PanopticEvaluator(CATEGORIES)
    for i in ShardedEvalSampler(len(images), rank, world_size, even=True):  # rank 1 repeats its last image
        evaluator.update([images[i][0]], [images[i][1]], [i])
    return evaluator.evaluate()


@pytest.mark.slow  # loads DeepSpeed here for the forked ranks: ~10 s
def test_one_and_two_ranks_give_the_same_metrics():
    rng = np.random.default_rng(1)
    images = [_random_image(rng) for _ in range(5)]
    single = PanopticEvaluator(CATEGORIES)
    single.update([p for p, _ in images], [g for _, g in images], list(range(5)))
    expected = single.evaluate()
    for world_size in (1, 2):
        results = run_ranks(_evaluate_shard, world_size, timeout=300, start_method="fork")
        assert all(result == results[0] for result in results)  # every rank: the same dict
        got, want = results[0]["panoptic"], expected["panoptic"]
        assert got.keys() == want.keys() and math.isnan(got["PQ/grass"]) == math.isnan(want["PQ/grass"])
        assert got == pytest.approx(want, abs=1e-12, nan_ok=True)  # IoU sums added in another order
