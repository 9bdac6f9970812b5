"""The detection models: torchvision detectors on timm bodies, their AGVM modules, specs and summary.

Models here are shrunk (tiny inputs, narrow FPN, a narrow Swin with the Swin-T layout) so the file
runs in about a minute on two CPU cores; the named definitions are checked on the meta device.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.ops import FrozenBatchNorm2d

from agvm_ds.agvm import assign_modules
from agvm_ds.commands.model_info import main
from agvm_ds.detection import ModelSpec, build_detector, load_spec, model_names
from agvm_ds.detection.summary import forward_flops, parameter_counts

# Most models here use frozen BN without weights, which warns (see the test of that warning).
pytestmark = pytest.mark.filterwarnings("ignore:.*norm=frozen_bn without pretrained_file")

DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet")
FAMILIES = ("resnet", "swin")
SWIN_T = "swin_tiny_patch4_window7_224"
# Swin-T's layout (4 stages, 2 blocks each so every stage has a shifted window) at a width that is
# quick on a CPU.
NARROW_SWIN = {"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8]}
# Few RoIs and candidates: tiny inputs do not need more, and eval on random weights stays fast.
FEW_ROIS = {
    "faster_rcnn": {"rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20, "box_batch_size_per_image": 32},
    "retinanet": {"topk_candidates": 50, "detections_per_img": 20},
}
FEW_ROIS["mask_rcnn"] = FEW_ROIS["faster_rcnn"]
EXPECTED_MODULES = {
    "faster_rcnn": {"backbone", "fpn", "rpn", "roi_box_head"},
    "mask_rcnn": {"backbone", "fpn", "rpn", "roi_box_head", "mask_head"},
    "retinanet": {"backbone", "fpn", "cls_head", "reg_head"},
}
REQUIRED_MODELS = {
    "faster_rcnn_r18_fpn", "faster_rcnn_r50_fpn", "mask_rcnn_r50_fpn", "retinanet_r50_fpn",
    "faster_rcnn_swin_t_fpn", "mask_rcnn_swin_t_fpn", "faster_rcnn_swin_s_fpn", "faster_rcnn_swin_b_fpn",
    "faster_rcnn_swin_l_fpn", "faster_rcnn_swinv2_1b_fpn", "faster_rcnn_r18_tiny", "mask_rcnn_r18_tiny",
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are small: on a shared 2-core machine a second thread costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_spec(detector: str, family: str, **overrides) -> ModelSpec:
    values = dict(detector=detector, num_classes=3, min_size=64, max_size=96, fpn_channels=16,
                  detector_kwargs=FEW_ROIS[detector])
    if family == "resnet":
        values.update(backbone="resnet18", norm="frozen_bn", trainable_stages=3)
    else:
        values.update(backbone=SWIN_T, trainable_stages=5, backbone_kwargs=NARROW_SWIN)
    values.update(overrides)
    return ModelSpec.from_dict(values)


def images_and_targets(with_masks: bool, height: int = 64, width: int = 96):
    images = [torch.rand(3, height, width, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    boxes = torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 20.0, 90.0, 60.0]])
    targets = []
    for _ in images:
        target = {"boxes": boxes.clone(), "labels": torch.tensor([1, 2])}
        if with_masks:
            masks = torch.zeros(2, height, width, dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
                mask[y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# --- training and inference -----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("detector", DETECTORS)
def test_train_step_has_finite_losses_and_a_gradient_for_every_trainable_parameter(detector, family):
    torch.manual_seed(0)
    model = build_detector(tiny_spec(detector, family)).train()
    images, targets = images_and_targets(detector == "mask_rcnn")

    losses = model(images, targets)
    sum(losses.values()).backward()

    assert len(losses) >= 2 and all(torch.isfinite(v) for v in losses.values()), losses
    if detector == "mask_rcnn":
        assert "loss_mask" in losses
    params = trainable(model)
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]} (+{max(len(missing) - 5, 0)})"
    assert all(torch.isfinite(p.grad).all() for p in params.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("detector", DETECTORS)
def test_eval_returns_one_prediction_per_image(detector, family):
    torch.manual_seed(0)
    model = build_detector(tiny_spec(detector, family)).eval()
    images, _ = images_and_targets(False)

    with torch.no_grad():
        predictions = model(images)

    assert len(predictions) == 2
    for prediction in predictions:
        n = len(prediction["scores"])
        assert prediction["boxes"].shape == (n, 4) and prediction["labels"].shape == (n,)
        if detector == "mask_rcnn":
            assert prediction["masks"].shape == (n, 1, 64, 96)


@pytest.mark.parametrize("detector", DETECTORS)
def test_batch_without_objects_still_gives_every_trainable_parameter_a_gradient(detector):
    # DeepSpeed and DDP expect a gradient for every parameter on every step, empty images included
    model = build_detector(tiny_spec(detector, "resnet")).train()
    images, _ = images_and_targets(False)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if detector == "mask_rcnn":
        empty["masks"] = torch.zeros(0, 64, 96, dtype=torch.uint8)

    losses = model(images, [dict(empty) for _ in images])
    sum(losses.values()).backward()

    assert all(torch.isfinite(v) for v in losses.values())
    assert [n for n, p in trainable(model).items() if p.grad is None] == []


def test_resize_in_model_false_leaves_training_images_at_their_size_and_resizes_evaluation_images():
    spec = tiny_spec("faster_rcnn", "resnet", min_size=128, max_size=256)
    images, targets = images_and_targets(False)

    resized, _ = build_detector(spec).train().transform(images, [dict(t) for t in targets])
    data_sized = build_detector(spec, resize_in_model=False)
    kept, kept_targets = data_sized.train().transform(images, [dict(t) for t in targets])
    evaluated, _ = data_sized.eval().transform(images)

    assert resized.image_sizes[0] == (128, 192)
    assert kept.image_sizes[0] == (64, 96) and kept.tensors.shape[-2:] == (64, 96)
    assert torch.equal(kept_targets[0]["boxes"], targets[0]["boxes"])
    assert evaluated.image_sizes[0] == (128, 192)


@pytest.mark.parametrize(
    "detector, levels",
    [("faster_rcnn", {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}),
     ("retinanet", {"0": 8, "1": 16, "2": 32, "p6": 64, "p7": 128})],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_returns_the_fpn_levels_torchvision_expects(detector, levels, family):
    model = build_detector(tiny_spec(detector, family))

    features = model.backbone(torch.zeros(1, 3, 128, 256))

    assert list(features) == list(levels)
    for key, stride in levels.items():
        assert features[key].shape == (1, 16, math.ceil(128 / stride), math.ceil(256 / stride)), key


# --- AGVM modules and frozen parameters -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("detector", DETECTORS)
def test_agvm_modules_hold_every_trainable_parameter_exactly_once(detector, family):
    model = build_detector(tiny_spec(detector, family))

    assigned = assign_modules(model, model.agvm_modules)

    assert set(assigned) == EXPECTED_MODULES[detector]
    names = [n for module_names in assigned.values() for n in module_names]
    assert len(names) == len(set(names)) and set(names) == set(trainable(model))
    assert all(n.startswith("backbone.fpn.") for n in assigned["fpn"])
    assert all(n.startswith(("backbone.body.", "backbone.norms.")) for n in assigned["backbone"])
    assert any(n.startswith("backbone.norms.") for n in assigned["backbone"]) == (family == "swin")


def test_trainable_stages_freeze_the_stem_and_early_resnet_stages():
    model = build_detector(tiny_spec("faster_rcnn", "resnet", trainable_stages=3))
    body = dict(model.backbone.body.named_parameters())

    frozen = {n.split(".")[0] for n, p in body.items() if not p.requires_grad}
    trained = {n.split(".")[0] for n, p in body.items() if p.requires_grad}

    assert frozen == {"conv1", "layer1"} and trained == {"layer2", "layer3", "layer4"}
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("backbone.body."))


def test_trainable_stages_freeze_the_patch_embedding_and_early_swin_stages():
    model = build_detector(tiny_spec("faster_rcnn", "swin", trainable_stages=2))
    body = dict(model.backbone.body.named_parameters())

    frozen = {".".join(n.split(".")[:2]) for n, p in body.items() if not p.requires_grad}

    assert frozen == {"patch_embed.proj", "patch_embed.norm", "layers.0", "layers.1"}
    assert all(p.requires_grad for n, p in body.items() if n.startswith(("layers.2.", "layers.3.")))
    assert isinstance(model.backbone.body.norm, nn.Identity)  # the unused final norm is pruned
    assert all(p.requires_grad for p in model.backbone.norms.parameters())


def test_frozen_bn_keeps_statistics_and_weights_fixed_while_bn_trains():
    images, targets = images_and_targets(False)
    frozen = build_detector(tiny_spec("faster_rcnn", "resnet", trainable_stages=5)).train()
    trained = build_detector(tiny_spec("faster_rcnn", "resnet", trainable_stages=5, norm="bn")).train()
    frozen_before = {k: v.clone() for k, v in frozen.backbone.body.state_dict().items()}

    frozen(images, targets)
    trained_bn = trained.backbone.body.bn1
    trained(images, targets)

    modules = list(frozen.backbone.body.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in modules) == 20  # resnet18: stem, 16 in blocks, 3 downsamples
    assert all(torch.equal(frozen_before[k], v) for k, v in frozen.backbone.body.state_dict().items())
    assert not any("bn" in n for n in trainable(frozen))
    assert isinstance(trained_bn, nn.BatchNorm2d) and trained_bn.weight.requires_grad
    assert not torch.equal(trained_bn.running_mean, torch.zeros_like(trained_bn.running_mean))


def test_frozen_bn_without_pretrained_weights_warns():
    with pytest.warns(UserWarning, match="norm=frozen_bn without pretrained_file"):
        build_detector(tiny_spec("faster_rcnn", "resnet"), device="meta")


def test_sync_bn_replaces_every_batch_norm():
    model = build_detector(tiny_spec("faster_rcnn", "resnet", norm="sync_bn"))

    norms = [m for m in model.backbone.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    assert len(norms) == 20 and all(isinstance(m, nn.SyncBatchNorm) for m in norms)


# --- activation checkpointing ---------------------------------------------------------------------


def _gradients(model: nn.Module, detector: str) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # RPN / RoI sampling
    images, targets = images_and_targets(detector == "mask_rcnn")
    sum(model(images, targets).values()).backward()
    return {n: p.grad.clone() for n, p in trainable(model).items()}


def test_grad_checkpointing_gives_the_same_gradients_and_recomputes_blocks():
    # drop path off: identical randomness in both passes is then trivially given
    spec = tiny_spec("faster_rcnn", "swin", trainable_stages=3, backbone_kwargs={**NARROW_SWIN, "drop_path_rate": 0.0})
    torch.manual_seed(0)
    model = build_detector(spec).train()
    block = model.backbone.body.layers[2].blocks[1]
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation stops early: no post hook

    plain = _gradients(model, "faster_rcnn")
    plain_calls = len(calls)
    model.backbone.body.set_grad_checkpointing(True)
    checkpointed = _gradients(model, "faster_rcnn")

    assert plain_calls == 1 and len(calls) - plain_calls == 2  # forward, then recomputed in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_spec_enables_timm_checkpointing(family):
    body = build_detector(tiny_spec("faster_rcnn", family, checkpointing=True)).backbone.body
    plain = build_detector(tiny_spec("faster_rcnn", family)).backbone.body

    if family == "swin":
        assert all(s.grad_checkpointing for s in body.layers) and not any(s.grad_checkpointing for s in plain.layers)
    else:
        assert body.grad_checkpointing and not plain.grad_checkpointing


# --- pretrained weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_backbone_loads_from_a_local_file(family, tmp_path):
    spec = tiny_spec("faster_rcnn", family)
    torch.manual_seed(123)
    source = timm.create_model(spec.backbone, **spec.backbone_kwargs)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    key = "layer3.0.conv1.weight" if family == "resnet" else "layers.2.blocks.1.attn.qkv.weight"

    torch.manual_seed(0)
    loaded = build_detector(spec.with_overrides({"pretrained_file": str(path)}))
    fresh = build_detector(spec)

    body = dict(loaded.backbone.body.named_parameters())
    assert torch.equal(body[key], source.state_dict()[key])
    assert not torch.equal(dict(fresh.backbone.body.named_parameters())[key], source.state_dict()[key])


def test_missing_pretrained_file_is_an_error_naming_the_key(tmp_path):
    spec = tiny_spec("faster_rcnn", "resnet", pretrained_file=str(tmp_path / "absent.pth"))

    with pytest.raises(FileNotFoundError, match="pretrained_file"):
        build_detector(spec)


# --- specs ----------------------------------------------------------------------------------------


def test_every_required_model_is_defined_and_valid():
    names = model_names()

    assert REQUIRED_MODELS <= set(names)
    for name in names:
        spec = load_spec(name)
        assert spec.name == name
    assert load_spec("faster_rcnn_swinv2_1b_fpn").checkpointing


def test_unknown_yaml_key_is_an_error_listing_the_valid_keys(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("detector: faster_rcnn\nbackbone: resnet18\nnum_clases: 5\n")

    with pytest.raises(ValueError, match="num_clases") as error:
        load_spec(path)

    assert "num_classes" in str(error.value) and "trainable_stages" in str(error.value)


@pytest.mark.parametrize(
    "overrides, key",
    [({"trainable_stages": 7}, "trainable_stages"),
     ({"norm": "group_norm"}, "norm"),
     ({"num_classes": 1}, "num_classes"),
     ({"min_size": 2000}, "max_size"),
     ({"backbone": "vit_base_patch16_224"}, "backbone"),
     ({"detector": "yolo"}, "detector"),
     ({"detector_kwargs.box_batch_size_per_image": 12.5}, "box_batch_size_per_image"),
     ({"detector_kwargs.box_batch_size": 64}, "box_batch_size_per_image")],  # unknown knob lists the valid
)
def test_bad_value_is_an_error_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        load_spec("faster_rcnn_r18_tiny", overrides)


def test_norm_of_a_swin_body_is_rejected():
    with pytest.raises(ValueError, match="norm='bn'.*ResNet"):
        load_spec("faster_rcnn_swin_t_fpn", {"norm": "bn"})


def test_overrides_set_dotted_keys_and_merge_mappings():
    base = load_spec("faster_rcnn_r18_tiny")

    spec = load_spec(
        "faster_rcnn_r18_tiny",
        {"num_classes": 3, "detector_kwargs.box_batch_size_per_image": 32, "backbone_kwargs": {"drop_path_rate": 0.1}},
    )

    assert spec.num_classes == 3
    assert spec.detector_kwargs == {**base.detector_kwargs, "box_batch_size_per_image": 32}
    assert spec.backbone_kwargs == {"drop_path_rate": 0.1}
    assert build_detector(spec).roi_heads.fg_bg_sampler.batch_size_per_image == 32


# --- sizes ----------------------------------------------------------------------------------------


def test_1b_model_has_about_a_billion_parameters_on_meta_without_memory():
    model = build_detector(load_spec("faster_rcnn_swinv2_1b_fpn"), device="meta")

    counts = parameter_counts(model)

    assert all(p.is_meta for p in model.parameters())
    assert 1.00e9 <= counts["total"] <= 1.06e9
    assert counts["backbone"] > 0.97 * counts["total"]
    assert all(stage.grad_checkpointing for stage in model.backbone.body.layers)


def test_r50_faster_rcnn_matches_torchvision_parameter_count():
    model = build_detector(load_spec("faster_rcnn_r50_fpn"), device="meta")

    # torchvision's fasterrcnn_resnet50_fpn (91 classes) has 41,755,286; 10 classes fewer remove
    # 10 x 1025 classifier and 40 x 1025 box-regression weights
    assert parameter_counts(model)["total"] == 41_755_286 - 50 * 1025


def test_resnet18_body_flops_match_its_published_cost():
    model = build_detector(tiny_spec("faster_rcnn", "resnet"), device="meta")

    flops = forward_flops(model, (224, 224))

    # ResNet-18 at 224: 1.814 GMACs including the 0.5M-MAC classifier this body drops
    assert flops["backbone"] == pytest.approx(2 * (1.814e9 - 0.513e6), rel=0.01)
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")
    assert all(flops[m] > 0 for m in EXPECTED_MODULES["faster_rcnn"])


def test_flops_on_meta_equal_flops_on_cpu():
    spec = tiny_spec("mask_rcnn", "swin")

    on_meta = forward_flops(build_detector(spec, device="meta"), (96, 128))
    on_cpu = forward_flops(build_detector(spec), (96, 128))

    assert on_meta == on_cpu and set(on_meta) == EXPECTED_MODULES["mask_rcnn"] | {"total"}


def test_summary_cli_prints_the_parameters_of_every_module(capsys):
    spec = load_spec("mask_rcnn_r18_tiny", {"num_classes": 3})
    expected = parameter_counts(build_detector(spec, device="meta"))

    assert main(["mask_rcnn_r18_tiny", "--size", "128", "--meta", "--set", "num_classes=3"]) == 0
    out = capsys.readouterr().out

    rows = {m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r"^(\w+)\s+([\d,]+)\s", out, re.M)}
    assert rows == expected
    assert set(rows) == EXPECTED_MODULES["mask_rcnn"] | {"total"}
    assert "128x128" in out and "Not counted" in out


# --- anchors --------------------------------------------------------------------------------------


def _anchor_generator(model: nn.Module):
    return model.anchor_generator if isinstance(model, RetinaNet) else model.rpn.anchor_generator


@pytest.mark.parametrize("detector", DETECTORS)
def test_default_spec_builds_torchvisions_default_anchors(detector):
    model = build_detector(tiny_spec(detector, "resnet"))
    cls = {"faster_rcnn": FasterRCNN, "mask_rcnn": FasterRCNN, "retinanet": RetinaNet}[detector]
    reference = _anchor_generator(cls(model.backbone, num_classes=3))  # torchvision picks its own anchors

    ours = _anchor_generator(model)

    assert ours.sizes == reference.sizes and ours.aspect_ratios == reference.aspect_ratios
    assert all(torch.equal(a, b) for a, b in zip(ours.cell_anchors, reference.cell_anchors))


@pytest.mark.parametrize("detector", DETECTORS)
def test_small_object_spec_builds_the_given_anchors_and_trains(detector):
    spec = tiny_spec(detector, "resnet", anchor_sizes=[8, 16, 32, 64, 128], aspect_ratios=[1.0, 2.0])
    model = build_detector(spec).train()

    anchors = _anchor_generator(model)
    assert anchors.sizes == ((8,), (16,), (32,), (64,), (128,)) and anchors.aspect_ratios == ((1.0, 2.0),) * 5
    assert anchors.cell_anchors[0].tolist() == [[-4.0, -4.0, 4.0, 4.0], [-3.0, -6.0, 3.0, 6.0]]
    losses = model(*images_and_targets(detector == "mask_rcnn"))
    assert all(torch.isfinite(v) for v in losses.values())


def test_anchors_per_level_may_differ_in_sizes_given_equal_counts():
    spec = tiny_spec("retinanet", "resnet", anchor_sizes=[[8, 12], [16, 24], [32, 48], [64, 96], [128, 192]],
                     aspect_ratios=[[1.0]] * 5)
    assert spec.to_dict()["anchor_sizes"][1] == [16, 24]
    assert _anchor_generator(build_detector(spec)).num_anchors_per_location() == [2] * 5


@pytest.mark.parametrize("overrides, message", [
    ({"anchor_sizes": [16, 32, 64, 128]}, "4 level(s) given, but faster_rcnn has 5 feature maps"),
    ({"aspect_ratios": [[1.0]] * 6}, "6 level(s) given, but faster_rcnn has 5 feature maps"),
    ({"anchor_sizes": [8, 16, 0, 64, 128]}, "expected positive numbers"),
    ({"aspect_ratios": [0.5, -1.0]}, "expected positive numbers"),
    ({"anchor_sizes": [[8], [16, 24], [32], [64], [128]]}, "every level needs the same number"),
    ({"anchor_sizes": 32}, "expected a list of numbers or of lists"),
])
def test_bad_anchors_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError) as error:
        load_spec("faster_rcnn_r18_tiny", overrides)
    assert message in str(error.value) and next(iter(overrides)) in str(error.value)


def test_pretrained_backbone_offline_and_uncached_is_one_error_naming_the_weights_and_pretrained_file(tmp_path):
    """``pretrained: true`` goes through timm's hub cache; with no network and an empty cache the error says
    which weights to fetch and that ``pretrained_file`` takes a local copy."""
    script = ("from agvm_ds.detection import build_detector, load_spec\n"
              "build_detector(load_spec('faster_rcnn_r18_tiny', {'pretrained': 'resnet18.a1_in1k'}))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "TORCH_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    assert last.startswith("RuntimeError: pretrained weights 'timm/resnet18.a1_in1k' of backbone 'resnet18.a1_in1k'")
    assert "model_overrides.pretrained_file" in last


@pytest.mark.parametrize("value, message", [
    ("resnet50.a1_in1k", "expected true, false, or a timm name of 'resnet18' weights"),
    (3, "expected true, false"),
])
def test_pretrained_must_name_weights_of_the_backbone(value, message):
    with pytest.raises(ValueError, match=message):
        load_spec("faster_rcnn_r18_tiny", {"pretrained": value})
    with pytest.raises(ValueError, match="pretrained_file is given too"):
        load_spec("faster_rcnn_r18_tiny", {"pretrained": True, "pretrained_file": "x.pth"})
