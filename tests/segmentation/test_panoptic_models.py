"""Panoptic FPN: spec rules, training step, AGVM modules, inference output, and the panoptic merge rules."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from agvm_ds.agvm import assign_modules
from agvm_ds.detection import ModelSpec, build_detector, load_spec
from agvm_ds.detection.spec import detector_knobs
from agvm_ds.segmentation import IGNORE_INDEX, PanopticFPN, combine_semantic_and_instance

TINY = "panoptic_fpn_r18_tiny"
MASK_RCNN_LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
MODULES = ["backbone", "fpn", "rpn", "roi_box_head", "mask_head", "semantic_head"]
SIZES = ((192, 256), (150, 220))
NUM_STUFF = 2  # the tiny spec's


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are small: on a shared 2-core machine a second thread costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(sizes=SIZES):
    """Two boxes with their masks per image; the semantic map marks them 0 (thing), the rest stuff 1 and 2."""
    images, targets = [], []
    for i, (h, w) in enumerate(sizes):
        images.append(torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)))
        boxes = torch.tensor([[20.0, 10.0, 90.0, 60.0], [100.0, 80.0, 200.0, 140.0]])
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        sem_seg = torch.ones(h, w, dtype=torch.int64)
        sem_seg[h // 2:] = 2
        sem_seg[:, :4] = IGNORE_INDEX
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = 1
            sem_seg[y0:y1, x0:x1] = 0
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks, "sem_seg": sem_seg})
    return images, targets


def build(seed: int = 0, **overrides) -> PanopticFPN:
    torch.manual_seed(seed)
    return build_detector(load_spec(TINY, overrides))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_tiny_model_loads_by_name_as_a_panoptic_model_with_anchors():
    spec = load_spec(TINY)

    assert spec.task == "panoptic" and spec.num_stuff_classes == NUM_STUFF
    assert spec.anchor_sizes == ((32,), (64,), (128,), (256,), (512,))
    model = build_detector(spec, device="meta")
    assert isinstance(model, PanopticFPN)
    assert model.semantic_head.classifier[-1].out_channels == NUM_STUFF + 1  # + class 0, "thing"
    assert model.stuff_area == 192 and model.roi_heads.fg_bg_sampler.batch_size_per_image == 64


def test_train_step_has_mask_rcnn_and_semantic_losses_and_a_gradient_for_every_trainable_parameter():
    model = build().train()
    images, targets = batch()

    losses = model(images, targets)
    sum(losses.values()).backward()

    assert set(losses) == MASK_RCNN_LOSSES | {"loss_sem_seg"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_sem_seg"] > 0, losses
    params = trainable(model)
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]} (+{max(len(missing) - 5, 0)})"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    assert all(p.grad.abs().sum() > 0 for n, p in params.items() if n.startswith("semantic_head."))


def test_semantic_weight_scales_the_semantic_loss():
    images, targets = batch()
    losses = []
    for weight in (0.5, 1.0):
        model = build(detector_kwargs={"semantic_weight": weight}).train()
        torch.manual_seed(1)
        losses.append(model(images, targets)["loss_sem_seg"])

    assert losses[1].item() == pytest.approx(2 * losses[0].item(), rel=1e-5)


def test_agvm_modules_hold_every_trainable_parameter_exactly_once_backbone_first():
    model = build_detector(load_spec(TINY), device="meta")

    assigned = assign_modules(model, model.agvm_modules)

    assert list(model.agvm_modules) == MODULES
    names = [n for module_names in assigned.values() for n in module_names]
    assert len(names) == len(set(names)) and set(names) == set(trainable(model))
    assert all(n.startswith("semantic_head.") for n in assigned["semantic_head"])


def test_eval_returns_instances_semantic_and_panoptic_maps_at_each_images_original_size():
    # threshold 0: random weights score low, and the merge should see instances
    model = build(detector_kwargs={"instance_score_threshold": 0.0, "stuff_area": 16}).eval()
    images, _ = batch(sizes=((100, 140), (256, 180)))

    with torch.no_grad():
        predictions = model(images)

    for prediction, size in zip(predictions, [(100, 140), (256, 180)]):
        n = len(prediction["scores"])
        assert prediction["boxes"].shape == (n, 4) and prediction["masks"].shape == (n, 1, *size)
        assert prediction["sem_seg"].shape == size and prediction["panoptic_seg"].shape == size
        assert prediction["panoptic_seg"].dtype == torch.int64 and prediction["sem_seg"].dtype == torch.int64
        assert 0 <= prediction["sem_seg"].min() and prediction["sem_seg"].max() <= NUM_STUFF
        segments = prediction["segments_info"]
        assert [s["id"] for s in segments] == list(range(1, len(segments) + 1))
        assert set(prediction["panoptic_seg"].unique().tolist()) - {0} == {s["id"] for s in segments}
        things = [s for s in segments if s["isthing"]]
        assert things and all(1 <= s["label"] < 5 and 0 <= s["score"] <= 1 for s in things)
        assert all(1 <= s["label"] <= NUM_STUFF and "score" not in s for s in segments if not s["isthing"])


def test_bf16_autocast_forward_and_backward():
    model = build().train()
    images, targets = batch()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    sum(losses.values()).backward()

    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable(model).values())


def test_checkpointing_gives_the_same_losses():
    plain = build().train()
    checkpointed = build(checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    images, targets = batch()

    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same RPN and RoI sampling
        losses = model(images, targets)
        sum(losses.values()).backward()
        results.append(losses)

    assert checkpointed.backbone.body.grad_checkpointing
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-5) for k in results[0])


@pytest.mark.filterwarnings("ignore:.*norm=frozen_bn without pretrained_file")
def test_r50_definition_is_mask_rcnn_plus_a_semantic_head_on_meta():
    spec = load_spec("panoptic_fpn_r50")
    panoptic = build_detector(spec, device="meta")
    mask_rcnn = build_detector(load_spec("mask_rcnn_r50_fpn"), device="meta")

    def count(model, prefix=""):
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))

    assert spec.num_classes == 81 and spec.num_stuff_classes == 53 and panoptic.stuff_area == 4096
    assert count(panoptic) == count(mask_rcnn) + count(panoptic, "semantic_head.")
    assert count(panoptic) / 1e6 == pytest.approx(45.98, rel=0.01)


# --- spec rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize("detector, stuff, match", [
    ("panoptic_fpn", 0, r"num_stuff_classes=0 is invalid: expected an integer >= 1 for panoptic_fpn"),
    ("mask_rcnn", 2, r"num_stuff_classes=2 is invalid: expected 0: only panoptic_fpn"),
    ("panoptic_fpn", -1, r"num_stuff_classes"),
])
def test_num_stuff_classes_rules_name_the_key(detector, stuff, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec.from_dict({"detector": detector, "backbone": "resnet18", "num_stuff_classes": stuff})


def test_panoptic_knobs_are_its_own_and_mask_rcnns():
    knobs = detector_knobs("panoptic_fpn")

    assert {"semantic_weight", "stuff_area", "overlap_threshold", "instance_score_threshold"} <= set(knobs)
    assert {"rpn_batch_size_per_image", "box_detections_per_img"} <= set(knobs)
    assert knobs["semantic_weight"] == 0.5 and knobs["stuff_area"] == 4096
    with pytest.raises(ValueError, match=r"not a knob of PanopticFPN; valid keys are .*'semantic_weight'"):
        load_spec(TINY, {"detector_kwargs.aux_weight": 0.4})
    with pytest.raises(ValueError, match=r"detector_kwargs.stuff_area=1.5 is invalid: expected a non-negative integer"):
        load_spec(TINY, {"detector_kwargs.stuff_area": 1.5})


# --- the merge ------------------------------------------------------------------------------------


def masks_of(*boxes, size=(8, 8)) -> torch.Tensor:
    """(N, H, W) float masks, 0.9 inside each (y0, y1, x0, x1) box, 0.1 outside."""
    masks = torch.full((len(boxes), *size), 0.1)
    for mask, (y0, y1, x0, x1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = 0.9
    return masks


def merge(masks, labels, scores, sem_seg, **kwargs):
    return combine_semantic_and_instance(masks, torch.tensor(labels), torch.tensor(scores), sem_seg, **kwargs)


def test_merge_places_instances_by_score_and_drops_one_mostly_covered():
    # B (score 0.9) claims its 4x4 first; A (0.8) overlaps it on 4 of its 8 pixels (0.5, not more):
    # kept, minus them; C (0.7) lies 7/8 inside B and A: dropped
    masks = masks_of((0, 2, 0, 4), (0, 4, 2, 6), (1, 3, 1, 5))
    sem_seg = torch.zeros(8, 8, dtype=torch.int64)

    panoptic, segments = merge(masks, [1, 2, 3], [0.8, 0.9, 0.7], sem_seg, stuff_area=1)

    assert segments == [{"id": 1, "isthing": True, "label": 2, "score": pytest.approx(0.9)},
                        {"id": 2, "isthing": True, "label": 1, "score": pytest.approx(0.8)}]
    assert (panoptic[0:4, 2:6] == 1).all()
    assert (panoptic[0:2, 0:2] == 2).all() and int((panoptic == 2).sum()) == 4
    assert int((panoptic == 0).sum()) == 64 - 16 - 4  # class 0 of the semantic map is no segment


def test_merge_overlap_threshold_decides_a_partly_covered_instance():
    masks = masks_of((0, 4, 0, 4), (0, 4, 2, 6))  # the second overlaps the first on half its pixels
    sem_seg = torch.zeros(8, 8, dtype=torch.int64)

    _, kept = merge(masks, [1, 1], [0.9, 0.8], sem_seg, overlap_threshold=0.5)
    _, dropped = merge(masks, [1, 1], [0.9, 0.8], sem_seg, overlap_threshold=0.4)

    assert len(kept) == 2 and len(dropped) == 1


def test_merge_stops_below_the_score_threshold_and_thresholds_mask_probabilities():
    masks = masks_of((0, 2, 0, 2), (4, 6, 4, 6))
    masks[0, 2, 0] = 0.5  # at the threshold: in the mask
    masks[0, 3, 0] = 0.49
    sem_seg = torch.zeros(8, 8, dtype=torch.int64)

    panoptic, segments = merge(masks, [1, 2], [0.6, 0.4], sem_seg, instance_score_threshold=0.5)

    assert [s["label"] for s in segments] == [1]
    assert int((panoptic == 1).sum()) == 5 and panoptic[3, 0] == 0


def test_merge_fills_free_pixels_with_stuff_of_at_least_stuff_area_and_ignores_class_0():
    sem_seg = torch.zeros(8, 8, dtype=torch.int64)
    sem_seg[:, 4:] = 1  # 32 pixels of stuff 1, 4 of them under the instance
    sem_seg[6:, :4] = 2  # 8 pixels of stuff 2
    masks = masks_of((0, 2, 2, 6))

    panoptic, segments = merge(masks, [3], [0.9], sem_seg, stuff_area=10)

    assert segments == [{"id": 1, "isthing": True, "label": 3, "score": pytest.approx(0.9)},
                        {"id": 2, "isthing": False, "label": 1}]
    assert int((panoptic == 2).sum()) == 32 - 4 and (panoptic[:2, 4:6] == 1).all()
    assert (panoptic[6:, :4] == 0).all()  # stuff 2 is below stuff_area: void
    assert (panoptic[2:6, :4] == 0).all()  # class 0 without an instance: void


def test_merge_of_nothing_is_all_void():
    panoptic, segments = merge(torch.zeros(0, 4, 4), [], [], torch.zeros(4, 4, dtype=torch.int64))

    assert segments == [] and not panoptic.any() and panoptic.dtype == torch.int64
