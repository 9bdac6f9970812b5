"""Activations of a training forward and backward, measured (:func:`measure_activations`).

**Activations** depend on every op of the model, so they are measured, not modelled. A per-block
formula scaled from a small model would have to guess what autograd saves, what autocast casts and
keeps, and what checkpointing recomputes; instead the training forward and backward are *run* with
tensors that hold no data and a dispatch mode that adds up the bytes of every tensor storage while it
is alive (:class:`LiveBytes`: storages are noted when an op first returns them and dropped when their
last reference dies, so autograd's saved tensors, checkpointing's recomputation and the gradients
are all counted when and as long as they exist). Three things bring this close to a GPU run:

- **The dense trunk** (backbone body, FPN, RPN/RetinaNet head, Panoptic FPN's semantic head and its
  loss: nearly all activation memory) runs under ``FakeTensorMode`` on CPU-typed fake tensors: the
  1B model at 1024x1024 costs no memory. Fake kernels give the shapes and dtypes the real kernels
  give; no real fallback kernel may run. A semantic model (Semantic FPN, UperNet) is dense all
  through: its whole training forward (its own ``forward``, given the transform's output) and loss
  run there, on synthetic label maps, and there is no rest.
- **Autocast on CUDA** is not autocast on CPU (CUDA runs ``layer_norm``, ``softmax``, norms, sums and
  upsampling in fp32, CPU in bf16, so a Swin's residual stream is fp32 on a GPU), and a fake CUDA
  tensor cannot go through autograd on a machine without a GPU. :func:`cuda_autocast_policy` gives
  CPU autocast CUDA's op lists (``ATen/autocast_mode.h``) for the duration of a measurement; a test
  checks that a Swin forward then returns, op for op, the dtypes torch's real CUDA autocast kernels
  return. Autocast's cache of bf16 weight copies is off, as the trainer turns it off (it would keep a
  bf16 copy of every weight through the forward, and what activation checkpointing discards);
  under ZeRO-3 the weights are gathered in bf16 already (``gathered_bf16``).
- **The data-dependent rest** (anchor matching, proposal NMS, sampling, RoIAlign, the box/mask heads
  and the losses) cannot run on tensors without data. It runs for real on CPU, fed with random
  feature maps and head outputs of the trunk's shapes and synthetic boxes; it is small (RoIs are
  sampled to ``box_batch_size_per_image``) and does not depend on the backbone's size.

The two are combined in the order a training step runs them (:func:`measure_activations`): trunk
forward, the rest forward and backward, trunk backward (which starts from the gradients the rest
made). ``tests/detection/test_memory_plan.py`` runs the same code on a small SwinV2 Faster R-CNN, on
``faster_rcnn_r18_tiny``, ``upernet_r18_tiny`` and ``panoptic_fpn_r18_tiny`` and compares the planned
peak with the CPU allocator's peak over a real training step on the targets of
:func:`synthetic_targets`. Not counted: cuDNN/cuBLAS workspaces, the CUDA context, NCCL buffers,
the caching allocator's rounding and fragmentation, NVMe swap buffers in host memory; the plan's
``--reserve`` stands for the GPU ones.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from ..detectors import build_detector
from ..spec import ModelSpec
from .cuda_autocast import cuda_autocast_policy
from .live_bytes import LiveBytes, _tensor_leaves
from .model_states import LOWER_PRECISION_SAFE_MODULES, PRECISIONS, _check_choice, _weight_dtype

__all__ = ["ActivationProfile", "BOXES_PER_IMAGE", "IGNORED_SHARE", "measure_activations", "synthetic_targets"]

#: Ground-truth boxes per synthetic image: the rest of the detector (matching, sampling, RoI heads)
#: is sized by its sampling knobs, not by this number, as long as enough proposals overlap them.
BOXES_PER_IMAGE = 8

#: Share of the pixels of a synthetic label map without a label (255), as real maps have some.
IGNORED_SHARE = 0.1


@dataclass(frozen=True)
class ActivationProfile:
    """Peak bytes a training forward + backward adds to the resident model states, for ``images``.

    Args:
        peak: activations alone: autograd's saved tensors, temporaries, autocast's bf16 weight
            copies, gradients flowing between ops; not the parameters' gradients, which ZeRO-2/3 move
            into their partition as they arrive.
        peak_with_grads: the same, with each parameter's gradient counted from when it is made, as
            ZeRO-0/1 keep them (the peak is less than ``peak`` + all gradients: they fill as the
            activations are freed).
        grads: bytes of the parameters' gradients at the end of backward.
    """

    images: int
    peak: int
    peak_with_grads: int
    grads: int


@dataclass(frozen=True)
class _Record:
    """A phase-marked :class:`LiveBytes` record and the keys of the parameter gradients it made."""

    tracker: LiveBytes
    grad_keys: frozenset
    grad_bytes: int


def measure_activations(spec: ModelSpec, images: int, size: tuple[int, int], precision: str,
                        gathered_bf16: bool = False, rest_cache: Optional[dict] = None) -> ActivationProfile:
    """Measures the activation memory of one training step of ``spec`` on ``images`` images of ``size``.

    Args:
        size: (height, width) of the network input, padded to a multiple of 32 as torchvision does.
        precision: one of :data:`PRECISIONS`; ``autocast-bf16`` runs under CUDA's autocast policy.
        gathered_bf16: the Linear/Conv weights are bf16 during the step, as ZeRO-3 under autocast
            gathers them (so autocast makes no bf16 copies of them).
        rest_cache: reuses the measurement of the detector's rest across calls for the same spec
            (it does not depend on the backbone's checkpointing).

    The backbone's activation checkpointing is ``spec.checkpointing``. Nothing is allocated for the
    backbone; the detector's data-dependent rest runs on CPU (see the module docstring).

    Raises:
        ValueError: when the model cannot train on ``images`` images per GPU (UperNet's BatchNorm
            heads need two), rather than give a number for a step that fails or cannot be measured.
    """
    _check_choice("precision", precision, PRECISIONS)
    _check_images(spec, images)
    height, width = (math.ceil(s / 32) * 32 for s in size)
    if spec.task == "semantic":
        whole = _measure_segmentor(spec, images, height, width, precision, gathered_bf16)
        return ActivationProfile(images=images, peak=whole.tracker.peak(exclude=whole.grad_keys),
                                 peak_with_grads=whole.tracker.peak(), grads=whole.grad_bytes)
    trunk, shapes = _measure_trunk(spec, images, height, width, precision, gathered_bf16)
    key = (images, height, width, precision, repr(shapes))
    cache = {} if rest_cache is None else rest_cache
    if key not in cache:
        cache[key] = _measure_rest(spec, images, height, width, precision, shapes)
    rest = cache[key]
    return ActivationProfile(
        images=images,
        peak=_combined_peak(trunk, rest, with_grads=False),
        peak_with_grads=_combined_peak(trunk, rest, with_grads=True),
        grads=trunk.grad_bytes + rest.grad_bytes,
    )


def _check_images(spec: ModelSpec, images: int) -> None:
    """UperNet's pooling pyramid has a 1x1 level whose BatchNorm sees one value per channel and image:
    a training step on one image fails; with ``norm: sync_bn`` it trains, the statistics spanning the
    ranks, but one process cannot run it to measure it."""
    if spec.detector != "upernet" or images > 1:
        return
    name = spec.name or spec.detector
    if spec.norm == "sync_bn":
        raise ValueError(f"{name}: UperNet's SyncBatchNorm heads on 1 image per GPU take their statistics over "
                         "the ranks, which one process cannot measure; plan for 2 images or more (an upper bound)")
    raise ValueError(f"{name}: UperNet's BatchNorm heads cannot train on 1 image per GPU (the 1x1 pooling level "
                     "has one value per channel); plan for 2 images or more")


def _combined_peak(trunk: _Record, rest: _Record, with_grads: bool) -> int:
    """The peak over a step that runs the trunk forward, the rest forward + backward, the trunk backward."""
    trunk_out = frozenset() if with_grads else trunk.grad_keys
    rest_out = frozenset() if with_grads else rest.grad_keys
    held_grads = rest.grad_bytes if with_grads else 0  # the heads' gradients stay through the trunk's backward
    return max(
        trunk.tracker.peak(end="forward", exclude=trunk_out),
        trunk.tracker.live("forward", trunk_out) + rest.tracker.peak(exclude=rest_out),
        trunk.tracker.peak(start="forward", exclude=trunk_out) + held_grads,
    )


def _measure_trunk(spec: ModelSpec, images: int, height: int, width: int, precision: str,
                   gathered_bf16: bool) -> tuple[_Record, dict[str, Any]]:
    """Runs backbone + dense head forward and backward on fake tensors; returns the record and the
    shapes/dtypes of the outputs the rest of the detector consumes."""
    targets = _seeded_targets(spec, images, height, width) if spec.task == "panoptic" else []
    with _fake_model(spec, precision, gathered_bf16) as (model, mode):
        labels = [mode.from_tensor(target["sem_seg"]) for target in targets]
        tracker = LiveBytes()
        with tracker:
            batch = torch.empty(images, 3, height, width, dtype=_weight_dtype(precision))  # the transform's output
            with _autocast(precision):
                features = model.backbone(batch)
                head = _dense_head(model, list(features.values()))
                losses = _semantic_branch_loss(model, features, labels, (height, width))
            del batch
            tracker.mark("forward")
            consumed = [features[name] for name in _pooled_levels(model)] + list(_tensor_leaves(head))
            sum(losses, _GradientSink.apply(*consumed)).backward()
            del losses
        grads = [p.grad for p in model.parameters()]
        shapes = {"features": _shapes(features), "head": _shapes(head)}
        return _Record(tracker, tracker.keys(grads), _nbytes(grads)), shapes


def _semantic_branch_loss(model: nn.Module, features: "OrderedDict[str, torch.Tensor]",
                          labels: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
    """Panoptic FPN's semantic loss, as its ``forward`` computes it from P2-P5 (empty for the others):
    dense, so it is part of the trunk."""
    if not hasattr(model, "semantic_head"):
        return []
    from ...segmentation.labels import fit_labels, segmentation_loss  # lazily: segmentation builds on detection

    levels = list(features.values())[:len(model.semantic_head.scale_heads)]
    logits = model.semantic_head(levels)
    return [model.semantic_weight * segmentation_loss(logits, fit_labels(labels, [size] * len(labels), size))]


def _measure_segmentor(spec: ModelSpec, images: int, height: int, width: int, precision: str,
                       gathered_bf16: bool) -> _Record:
    """Runs a semantic model's training step, forward (the model's own, from the transform's output
    on) and backward, on fake tensors and synthetic label maps."""
    targets = _seeded_targets(spec, images, height, width)
    with _fake_model(spec, precision, gathered_bf16) as (model, mode):
        targets = [{"sem_seg": mode.from_tensor(target["sem_seg"])} for target in targets]
        tracker = LiveBytes()
        with tracker:
            model.transform = _GivenBatch(torch.empty(images, 3, height, width, dtype=_weight_dtype(precision)))
            with _autocast(precision):
                losses = model([torch.empty(3, 0, 0)] * images, targets)  # the stand-in transform ignores them
            tracker.mark("forward")
            sum(losses.values()).backward()
            del losses
        grads = [p.grad for p in model.parameters()]
        return _Record(tracker, tracker.keys(grads), _nbytes(grads))


class _GivenBatch(nn.Module):
    """Stands in for a segmenter's transform: hands over the given padded batch (the transform's
    output) once, keeping no reference to it, with every image the batch's size."""

    def __init__(self, batch: torch.Tensor) -> None:
        super().__init__()
        self.batch: Optional[torch.Tensor] = batch

    def forward(self, images: list[torch.Tensor], targets: Any = None) -> tuple[ImageList, Any]:
        batch, self.batch = self.batch, None
        return ImageList(batch, [tuple(batch.shape[-2:])] * len(batch)), targets


@contextlib.contextmanager
def _fake_model(spec: ModelSpec, precision: str, gathered_bf16: bool) -> Iterator[tuple[nn.Module, FakeTensorMode]]:
    """The model of ``spec`` with fake parameters in training mode, under the fake mode it yields
    and the precision's autocast policy."""
    model = build_detector(spec, device="meta")  # timm's constructors read values: not under FakeTensorMode
    with _autocast_policy(precision), FakeTensorMode(allow_fallback_kernels=False) as mode:
        _make_fake(model, precision, gathered_bf16)
        yield model, mode


class _GradientSink(torch.autograd.Function):
    """A scalar whose backward hands each input a fresh gradient of its shape: what the rest of the
    detector (RoIAlign, the RPN/RetinaNet losses) sends the trunk, made when the trunk's backward starts."""

    @staticmethod
    def forward(ctx, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.specs = [(t.shape, t.dtype) for t in tensors]
        return tensors[0].new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, _: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.ones(shape, dtype=dtype) for shape, dtype in ctx.specs)


def _make_fake(model: nn.Module, precision: str, gathered_bf16: bool) -> None:
    """Replaces each parameter and buffer of a meta-device ``model`` by a fake CPU tensor of the dtype
    the run gives it (under ``FakeTensorMode``), and puts it in training mode."""
    weight_dtype = _weight_dtype(precision)
    for module in model.modules():
        lower = gathered_bf16 and type(module) in LOWER_PRECISION_SAFE_MODULES
        for name, param in module.named_parameters(recurse=False):
            dtype = torch.bfloat16 if lower else weight_dtype
            module._parameters[name] = nn.Parameter(torch.empty(param.shape, dtype=dtype),
                                                    requires_grad=param.requires_grad)
        for name, buffer in module.named_buffers(recurse=False):
            dtype = weight_dtype if buffer.is_floating_point() else buffer.dtype  # the trainer casts float buffers
            module._buffers[name] = torch.empty(buffer.shape, dtype=dtype)
    model.train()


def _measure_rest(spec: ModelSpec, images: int, height: int, width: int, precision: str,
                  shapes: dict[str, Any]) -> _Record:
    """Runs the detector after its dense head (proposals, matching, sampling, RoI heads, losses)
    forward and backward on real CPU tensors, fed with random trunk outputs of ``shapes``.

    With 16-bit weights (DeepSpeed's bf16/fp16 sections) this part runs in fp32, an upper bound for a
    small part: torchvision's ``nms`` has no bf16 CPU kernel (these sections do not train torchvision
    detectors here at all, see ``ds_configs/README.md``).
    """
    if _weight_dtype(precision) != torch.float32:
        shapes = _map_specs(lambda shape, _: (shape, torch.float32), shapes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _cpu_rest(spec)
        features, head = _map_specs(_leaf, shapes["features"]), _map_specs(_leaf, shapes["head"])
        targets = synthetic_targets(spec, images, height, width)
        image_list = ImageList(torch.zeros(()).expand(images, 3, height, width), [(height, width)] * images)
        tracker = LiveBytes()
        with _autocast_policy(precision), tracker:
            with _autocast(precision):
                losses = _rest_losses(model, image_list, features, head, targets)
            tracker.mark("forward")
            sum(losses.values()).backward()
        grads = [p.grad for p in model.parameters() if p.device.type == "cpu"]
        return _Record(tracker, tracker.keys(grads), _nbytes(grads))


def _cpu_rest(spec: ModelSpec) -> nn.Module:
    """A detector on the meta device whose parts after the dense head are real CPU modules (small
    random weights) and whose RPN head hands back given outputs."""
    model = build_detector(spec, device="meta")
    if isinstance(model, RetinaNet):
        parts = [model.head]
    else:
        model.rpn.head = _GivenOutputs()
        parts = [model.rpn, model.roi_heads]
    for part in parts:
        part.to_empty(device="cpu")
        with torch.no_grad():
            for param in part.parameters():
                param.normal_(0.0, 0.01)
    return model.train()


class _GivenOutputs(nn.Module):
    """Stands in for the RPN head: returns the outputs set in ``outputs``."""

    outputs: Any = None

    def forward(self, _: Any) -> Any:
        return self.outputs


def _rest_losses(model: nn.Module, image_list: ImageList, features: "OrderedDict[str, torch.Tensor]",
                 head: Any, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The training losses torchvision's detector computes from the trunk's outputs."""
    if isinstance(model, RetinaNet):
        anchors = model.anchor_generator(image_list, list(features.values()))
        return model.compute_loss(targets, head, anchors)
    model.rpn.head.outputs = head
    proposals, rpn_losses = model.rpn(image_list, features, targets)
    _, roi_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets)
    return {**rpn_losses, **roi_losses}


def synthetic_targets(spec: ModelSpec, images: int, height: int, width: int) -> list[dict[str, torch.Tensor]]:
    """Random training targets of ``spec``'s task for ``images`` images of ``height`` x ``width``.

    Detection: boxes and labels (:data:`BOXES_PER_IMAGE`); instance: and their box masks; semantic:
    an (h, w) ``sem_seg`` map of random classes with :data:`IGNORED_SHARE` of the pixels 255;
    panoptic: Mask R-CNN's targets and a ``sem_seg`` map of random stuff classes (1..S), 0 on the
    things' masks, 255 on :data:`IGNORED_SHARE` of the pixels.
    """
    if spec.task == "semantic":
        return [{"sem_seg": _label_map(torch.randint(0, spec.num_classes, (height, width)))} for _ in range(images)]
    targets = _synthetic_targets(images, height, width, spec.num_classes, spec.task in ("instance", "panoptic"))
    if spec.task == "panoptic":
        for target in targets:
            stuff = torch.randint(1, spec.num_stuff_classes + 1, (height, width))
            target["sem_seg"] = _label_map(stuff.masked_fill(target["masks"].bool().any(0), 0))
    return targets


def _seeded_targets(spec: ModelSpec, images: int, height: int, width: int) -> list[dict[str, torch.Tensor]]:
    """:func:`synthetic_targets`, the same on every call, leaving the caller's random state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return synthetic_targets(spec, images, height, width)


def _label_map(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with :data:`IGNORED_SHARE` of the pixels, at random, set to 255 (no label)."""
    return labels.masked_fill(torch.rand(labels.shape) < IGNORED_SHARE, 255)


def _synthetic_targets(images: int, height: int, width: int, num_classes: int,
                       masks: bool) -> list[dict[str, torch.Tensor]]:
    """Random boxes of 5-35% of the image side (and box masks), as ``benchmarks/throughput.py`` makes."""
    targets = []
    for _ in range(images):
        extent = torch.rand(BOXES_PER_IMAGE, 2) * 0.3 + 0.05
        corner = torch.rand(BOXES_PER_IMAGE, 2) * (1 - extent)
        scale = torch.tensor([width, height], dtype=torch.float32)
        boxes = torch.cat([corner * scale, (corner + extent) * scale], dim=1)
        target = {"boxes": boxes, "labels": torch.randint(1, num_classes, (BOXES_PER_IMAGE,))}
        if masks:
            target["masks"] = torch.zeros(BOXES_PER_IMAGE, height, width, dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(target["masks"], boxes.round().int().tolist()):
                mask[y1:y2, x1:x2] = 1
        targets.append(target)
    return targets


def _dense_head(model: nn.Module, levels: list[torch.Tensor]) -> Any:
    return model.head(levels) if isinstance(model, RetinaNet) else model.rpn.head(levels)


def _pooled_levels(model: nn.Module) -> list[str]:
    """The feature maps RoIAlign reads (they get gradients from the RoI heads); none for RetinaNet."""
    if isinstance(model, RetinaNet):
        return []
    heads = model.roi_heads
    pools = [heads.box_roi_pool] + ([heads.mask_roi_pool] if heads.has_mask() else [])
    return list(OrderedDict.fromkeys(name for pool in pools for name in pool.featmap_names))


def _shapes(tree: Any) -> Any:
    """``tree`` with each tensor replaced by its ``(shape, dtype)``."""
    return tree_map(lambda t: (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else t, tree)


def _map_specs(fn: Callable[[tuple, torch.dtype], Any], tree: Any) -> Any:
    """``tree`` with each ``(shape, dtype)`` of :func:`_shapes` replaced by ``fn(shape, dtype)``."""
    return tree_map(lambda spec: fn(*spec), tree, is_leaf=_is_spec)


def _is_spec(node: Any) -> bool:
    return isinstance(node, tuple) and len(node) == 2 and isinstance(node[1], torch.dtype)


def _leaf(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape) * 0.1).to(dtype).requires_grad_()


def _nbytes(tensors: Sequence[Optional[torch.Tensor]]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    """DeepSpeed's ``torch_autocast`` around the forward (on CPU tensors, see :func:`cuda_autocast_policy`),
    with the weight-cast cache off as the trainer runs it."""
    if precision != "autocast-bf16":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)


def _autocast_policy(precision: str) -> contextlib.AbstractContextManager:
    return cuda_autocast_policy() if precision == "autocast-bf16" else contextlib.nullcontext()
