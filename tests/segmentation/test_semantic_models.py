"""Semantic segmentation models (Semantic FPN, UperNet): specs, training steps, AGVM modules, inference.

The shipped tiny definitions are trained on random images of two sizes; the real-scale ones are
built on the meta device and their parameters counted against mmseg's published sizes.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from agvm_ds.agvm import assign_modules
from agvm_ds.detection import ModelSpec, build_detector, load_spec
from agvm_ds.detection.spec import detector_knobs
from agvm_ds.segmentation import IGNORE_INDEX, SemanticFPN, UperNet, fit_labels, segmentation_loss

TINY = ("semantic_fpn_r18_tiny", "upernet_r18_tiny")
LOSS_KEYS = {"semantic_fpn_r18_tiny": {"loss_seg"}, "upernet_r18_tiny": {"loss_seg", "loss_aux"}}
MODULES = {
    "semantic_fpn_r18_tiny": ["backbone", "fpn", "decode_head"],
    "upernet_r18_tiny": ["backbone", "decode_head", "auxiliary_head"],
}
SIZES = ((192, 256), (150, 220))  # the second is resized and padded by the model
NUM_CLASSES = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models are small: on a shared 2-core machine a second thread costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed: int = 0, sizes=SIZES, num_classes: int = NUM_CLASSES):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
    targets = []
    for h, w in sizes:
        # blocky labels (16x16 cells) with an unlabelled strip, so there is something to learn and to ignore
        cells = torch.randint(0, num_classes, ((h + 15) // 16, (w + 15) // 16), generator=generator)
        labels = cells.repeat_interleave(16, 0).repeat_interleave(16, 1)[:h, :w].clone()
        labels[:, :8] = IGNORE_INDEX
        targets.append({"sem_seg": labels})
    return images, targets


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def build(name: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return build_detector(load_spec(name, overrides))


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_loads_by_name_as_a_semantic_model_without_anchors(name):
    spec = load_spec(name)

    assert spec.task == "semantic" and spec.num_stuff_classes == 0
    assert spec.anchor_sizes is None and spec.aspect_ratios is None
    assert spec.with_overrides({"num_classes": 150}).num_classes == 150  # to_dict round trip
    assert isinstance(build_detector(spec, device="meta"), SemanticFPN if "fpn" in name else UperNet)


@pytest.mark.parametrize("name", TINY)
def test_train_step_has_finite_losses_and_a_gradient_for_every_trainable_parameter(name):
    model = build(name).train()
    images, targets = batch()

    losses = model(images, targets)
    sum(losses.values()).backward()

    assert set(losses) == LOSS_KEYS[name]
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    params = trainable(model)
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]} (+{max(len(missing) - 5, 0)})"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    # every head parameter is connected to the loss (the body's residual branches start switched
    # off: timm zero-initialises each block's last BN weight)
    assert all(p.grad.abs().sum() > 0 for n, p in params.items() if not n.startswith("backbone.body."))


@pytest.mark.parametrize("name", TINY)
def test_agvm_modules_hold_every_trainable_parameter_exactly_once_backbone_first(name):
    model = build_detector(load_spec(name), device="meta")

    assigned = assign_modules(model, model.agvm_modules)

    assert list(model.agvm_modules) == MODULES[name]
    names = [n for module_names in assigned.values() for n in module_names]
    assert len(names) == len(set(names)) and set(names) == set(trainable(model))
    assert all(n.startswith("backbone.body.") for n in assigned["backbone"])


def test_no_auxiliary_head_without_its_loss_and_one_with_it():
    without = build_detector(load_spec("upernet_r18_tiny", {"detector_kwargs.aux_weight": 0}), device="meta")
    with_aux = build_detector(load_spec("semantic_fpn_r18_tiny", {"detector_kwargs.aux_weight": 0.4}), device="meta")

    assert without.auxiliary_head is None and "auxiliary_head" not in without.agvm_modules
    assert with_aux.auxiliary_head is not None and list(with_aux.agvm_modules)[-1] == "auxiliary_head"
    assert with_aux.auxiliary_head[0][0].in_channels == 256  # ResNet-18's C4


@pytest.mark.parametrize("name", TINY)
def test_eval_predicts_a_label_per_pixel_at_each_images_original_size(name):
    model = build(name).eval()
    images, _ = batch(sizes=((100, 140), (256, 180)))

    with torch.no_grad():
        predictions = model(images)

    assert [tuple(p["sem_seg"].shape) for p in predictions] == [(100, 140), (256, 180)]
    for prediction in predictions:
        assert set(prediction) == {"sem_seg"} and prediction["sem_seg"].dtype == torch.int64
        assert 0 <= prediction["sem_seg"].min() and prediction["sem_seg"].max() < NUM_CLASSES


def test_eval_resizes_images_to_the_spec_size_even_when_training_does_not():
    model = build_detector(load_spec("semantic_fpn_r18_tiny"), resize_in_model=False)
    images, targets = batch(sizes=((64, 96),))

    trained, _ = model.train().transform(images)
    evaluated, _ = model.eval().transform(images)
    model.train()(images, targets)  # labels at the image's own size: no resize needed

    assert trained.image_sizes == [(64, 96)] and evaluated.image_sizes == [(170, 256)]


def test_labels_follow_their_image_through_resize_and_padding():
    labels = torch.tensor([[0, 1], [2, 255]])

    fitted = fit_labels([labels, labels], [(4, 4), (2, 2)], (4, 6))

    assert fitted.shape == (2, 4, 6) and fitted.dtype == torch.int64
    assert torch.equal(fitted[0, :, :4], labels.repeat_interleave(2, 0).repeat_interleave(2, 1))  # nearest
    assert torch.equal(fitted[1, :2, :2], labels)
    assert (fitted[0, :, 4:] == IGNORE_INDEX).all() and (fitted[1, 2:] == IGNORE_INDEX).all()


def test_loss_averages_over_labelled_pixels_and_is_zero_without_any():
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 1], [255, 255]]])
    unlabelled = torch.full((1, 4, 4), IGNORE_INDEX)

    loss = segmentation_loss(logits, labels)
    empty = segmentation_loss(logits, unlabelled)  # upsampled to the labels' 4x4 first
    empty.backward()

    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item())
    assert empty.item() == 0 and logits.grad is not None


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_forward_and_backward(name):
    model = build(name).train()
    images, targets = batch()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    sum(losses.values()).backward()

    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable(model).values())


@pytest.mark.parametrize("name", TINY)
def test_checkpointing_gives_the_same_loss_and_gradients(name):
    plain = build(name).train()
    checkpointed = build(name, checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    images, targets = batch()

    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks
        losses = model(images, targets)
        sum(losses.values()).backward()
        results.append((losses, model.backbone.body.layer1[0].conv1.weight.grad))

    assert checkpointed.backbone.body.grad_checkpointing and not plain.backbone.body.grad_checkpointing
    (plain_losses, plain_grad), (ckpt_losses, ckpt_grad) = results
    assert all(torch.allclose(plain_losses[k], ckpt_losses[k], atol=1e-6) for k in plain_losses)
    assert torch.allclose(plain_grad, ckpt_grad, atol=1e-5)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    model = build("semantic_fpn_r18_tiny", min_size=96, max_size=128).train()
    images, targets = batch(sizes=((96, 128), (96, 128)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    losses = []
    for _ in range(8):
        loss = model(images, targets)["loss_seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert min(losses[-3:]) < 0.75 * losses[0], losses


def test_sync_bn_spec_synchronises_the_head_batch_norms():
    model = build_detector(load_spec("upernet_r18_tiny", {"norm": "sync_bn"}), device="meta")

    heads = [*model.decode_head.modules(), *model.auxiliary_head.modules()]
    head_norms = [m for m in heads if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    assert head_norms and all(isinstance(m, nn.SyncBatchNorm) for m in head_norms)


# --- real-scale definitions -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*norm=frozen_bn without pretrained_file")
@pytest.mark.parametrize(
    "name, millions",
    # mmseg's published sizes: Semantic FPN R-50 28.5M, UperNet Swin-T/S/B 60M/81M/121M
    [("semantic_fpn_r50", 28.5), ("upernet_swin_t", 59.9), ("upernet_swin_s", 81.3), ("upernet_swin_b", 121.3),
     ("upernet_swinv2_1b", 1058.0)],
)
def test_real_scale_definition_builds_on_meta_with_its_parameter_count(name, millions):
    spec = load_spec(name)
    model = build_detector(spec, device="meta")

    count = sum(p.numel() for p in model.parameters())

    assert spec.task == "semantic" and spec.num_classes == 150 and spec.min_size == 512
    assert count / 1e6 == pytest.approx(millions, rel=0.01)
    assert all(p.is_meta for p in model.parameters())
    assert spec.checkpointing == (name == "upernet_swinv2_1b")
    assign_modules(model, model.agvm_modules)


# --- spec rules -----------------------------------------------------------------------------------


def test_semantic_knobs_are_the_numeric_arguments_of_the_model_class():
    assert {"decode_channels", "aux_weight", "aux_channels", "dropout"} <= set(detector_knobs("upernet"))
    assert detector_knobs("upernet")["aux_weight"] == 0.4 and detector_knobs("semantic_fpn")["aux_weight"] == 0.0
    assert not {"min_size", "max_size", "num_classes"} & set(detector_knobs("semantic_fpn"))


def test_unknown_knob_is_an_error_listing_the_valid_ones():
    with pytest.raises(ValueError, match=r"detector_kwargs.rpn_batch_size_per_image is not a knob of UperNet.*"
                                         r"'aux_weight'.*'decode_channels'"):
        load_spec("upernet_r18_tiny", {"detector_kwargs.rpn_batch_size_per_image": 64})


def test_negative_knob_value_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"detector_kwargs.aux_weight=-1"):
        load_spec("upernet_r18_tiny", {"detector_kwargs.aux_weight": -1})


@pytest.mark.parametrize("overrides, match", [
    ({"num_stuff_classes": 3}, r"num_stuff_classes=3 is invalid: expected 0: only panoptic_fpn"),
    ({"anchor_sizes": [8, 16, 32, 64, 128]}, r"anchor_sizes=.*semantic_fpn has no anchors"),
    ({"num_classes": 1}, r"num_classes"),
])
def test_semantic_spec_rules_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec.from_dict({"detector": "semantic_fpn", "backbone": "resnet18", **overrides})
