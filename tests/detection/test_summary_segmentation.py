"""``agvm-model-info`` and the memory plan on the segmentation models: parameters and FLOPs per AGVM
module (Semantic FPN, UperNet, Panoptic FPN), the class counts in each task's words, the synthetic
targets the plan measures on, and the plan's refusal of a step that cannot run."""
from __future__ import annotations

import re

import pytest
import torch

from agvm_ds.commands.model_info import main as model_info
from agvm_ds.detection import build_detector, load_spec, memory
from agvm_ds.detection.summary import forward_flops, parameter_counts, roi_counts

#: The AGVM modules of each tiny segmentation model: every one computes, so every one has FLOPs.
MODULES = {
    "semantic_fpn_r18_tiny": {"backbone", "fpn", "decode_head"},
    "upernet_r18_tiny": {"backbone", "decode_head", "auxiliary_head"},
    "panoptic_fpn_r18_tiny": {"backbone", "fpn", "rpn", "roi_box_head", "mask_head", "semantic_head"},
}
CLASS_WORDS = {
    "semantic_fpn_r18_tiny": "4 classes (no background)",
    "upernet_r18_tiny": "4 classes (no background)",
    "panoptic_fpn_r18_tiny": "5 thing classes (incl. background), 2 stuff classes",
}


def _rows(out: str) -> dict[str, tuple[int, float]]:
    """module -> (parameters, GFLOPs) of the command's table."""
    return {m.group(1): (int(m.group(2).replace(",", "")), float(m.group(3)))
            for m in re.finditer(r"^(\w+)\s+([\d,]+)\s+[\d,]+\s+([\d.]+)$", out, re.M)}


@pytest.mark.parametrize("model", sorted(MODULES))
def test_model_info_lists_every_module_with_its_parameters_and_flops(model, capsys):
    assert model_info([model, "--meta", "--size", "128"]) == 0
    out = capsys.readouterr().out

    rows = _rows(out)
    assert set(rows) == MODULES[model] | {"total"}
    assert {m: p for m, (p, _) in rows.items()} == parameter_counts(build_detector(load_spec(model), device="meta"))
    assert CLASS_WORDS[model] in out and "incl. background" not in out.replace(CLASS_WORDS[model], "")
    assert "128x128" in out and "Not counted" in out
    flops = forward_flops(build_detector(load_spec(model), device="meta"), (128, 128))
    assert set(flops) == MODULES[model] | {"total"} and all(flops[m] > 0 for m in MODULES[model])


def test_panoptic_semantic_head_is_counted_on_p2_to_p5():
    model = build_detector(load_spec("panoptic_fpn_r18_tiny"), device="meta")
    head = model.semantic_head

    flops = forward_flops(model, (128, 128))

    # level i (stride 4 * 2**i) runs max(i, 1) 3x3 convs, the first from the FPN's width, each but
    # level 0's followed by a 2x upsampling; then a 1x1 classifier at stride 4
    fpn, width, classes = 64, head.classifier[1].in_channels, head.classifier[1].out_channels
    macs = 32 * 32 * width * classes
    for level in range(4):
        side = 32 // 2 ** level
        for k in range(max(level, 1)):
            macs += (side * 2 ** k) ** 2 * 9 * (fpn if k == 0 else width) * width
    assert flops["semantic_head"] == 2 * macs


def test_upernet_auxiliary_head_runs_in_training_only_and_has_no_rois(capsys):
    model = build_detector(load_spec("upernet_r18_tiny"), device="meta")

    assert roi_counts(model) == {}
    assert model_info(["upernet_r18_tiny", "--meta"]) == 0
    assert "auxiliary_head runs in training only" in capsys.readouterr().out


def test_segmentation_flops_on_meta_equal_flops_on_cpu():
    spec = load_spec("upernet_r18_tiny")

    on_meta = forward_flops(build_detector(spec, device="meta"), (96, 128))
    assert on_meta == forward_flops(build_detector(spec), (96, 128))


def test_1b_upernet_on_meta_without_memory(capsys):
    assert model_info(["upernet_swinv2_1b", "--meta", "--size", "512"]) == 0
    rows = _rows(capsys.readouterr().out)

    assert set(rows) == {"backbone", "decode_head", "auxiliary_head", "total"}
    assert 1.0e9 <= rows["total"][0] <= 1.1e9
    assert all(gflops > 0 for _, gflops in rows.values())


# ---------------------------------------------------------------------------------------------- the plan


def test_synthetic_targets_follow_the_task():
    semantic, panoptic = load_spec("upernet_r18_tiny"), load_spec("panoptic_fpn_r18_tiny")

    (target,) = memory.synthetic_targets(semantic, 1, 64, 96)
    labels = target["sem_seg"]
    assert set(target) == {"sem_seg"} and labels.shape == (64, 96) and labels.dtype == torch.int64
    assert (labels == 255).any() and labels[labels != 255].max() < semantic.num_classes

    (target,) = memory.synthetic_targets(panoptic, 1, 64, 96)
    assert set(target) == {"boxes", "labels", "masks", "sem_seg"}
    stuff = target["sem_seg"][target["masks"].sum(0) == 0]
    assert set(target["sem_seg"][target["masks"].bool().any(0)].unique().tolist()) <= {0, 255}
    assert set(stuff.unique().tolist()) <= {255, *range(1, panoptic.num_stuff_classes + 1)} and (stuff == 255).any()


@pytest.mark.parametrize("model", ["upernet_r18_tiny", "semantic_fpn_r18_tiny", "panoptic_fpn_r18_tiny"])
def test_plan_command_measures_segmentation_models(model, capsys):
    assert model_info([model, "--plan", "--size", "128", "--images", "2", "--stage", "2", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("2", "3")]
    assert len(rows) == 2 and all(float(row[10]) > 0 for row in rows)  # the act column


@pytest.mark.parametrize("norm, says", [("bn", "cannot train on 1 image"), ("sync_bn", "cannot measure")])
def test_plan_refuses_upernet_on_one_image_in_one_line(capsys, norm, says):
    """The 1x1 pooling level's BatchNorm cannot train on one image, and a SyncBatchNorm's statistics over
    the ranks cannot be measured in one process: no number for such a step."""
    assert model_info(["upernet_r18_tiny", "--plan", "--size", "128", "--set", f"norm={norm}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "2 images or more" in err
