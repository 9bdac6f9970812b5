"""Parameters and forward FLOPs of a detector, per AGVM module, and with ``--plan`` the memory one GPU
needs to train it (``agvm-model-info``; the plan is ``memory.py``'s).

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` part by part (body, FPN, heads on
pooled RoIs of the right shape) rather than through the whole detector: torchvision's ``nms`` and
``roi_align`` have no meta kernels, and counting the parts works the same on the meta device (a 1B
model costs no memory) and on the CPU. FlopCounterMode counts matrix products, convolutions and
attention; RoIAlign, NMS, anchors, box decoding and the transform's resize are not counted (they
are a small share of a detector's cost).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import MaskRCNN, RetinaNet

from ..config_checks import parse_overrides
from ..resources import find, shipped_names
from . import memory
from .detectors import build_detector
from .spec import ModelSpec, load_spec

__all__ = ["forward_flops", "main", "parameter_counts", "roi_counts"]


def parameter_counts(model: nn.Module, trainable_only: bool = False) -> dict[str, int]:
    """Number of parameters per AGVM module of ``model.agvm_modules``, and ``"total"``.

    A parameter belongs to the module with its longest matching prefix; parameters of no module (none
    in a detector built here) are counted under ``"other"``.
    """
    counts = {module: 0 for module in model.agvm_modules}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        owners = [
            (len(prefix), module)
            for module, prefixes in model.agvm_modules.items()
            for prefix in prefixes
            if name == prefix or name.startswith(prefix + ".")
        ]
        owner = max(owners)[1] if owners else "other"
        counts[owner] = counts.get(owner, 0) + param.numel()
    counts["total"] = sum(counts.values())
    return counts


def roi_counts(model: nn.Module) -> dict[str, int]:
    """The number of RoIs per image the heads of an R-CNN run on at inference, at most.

    The box head sees every proposal the RPN keeps (``rpn_post_nms_top_n_test``), the mask head every
    detection (``box_detections_per_img``). Empty for RetinaNet, whose heads are dense.
    """
    if isinstance(model, RetinaNet):
        return {}
    counts = {"roi_box_head": model.rpn._post_nms_top_n["testing"]}  # rpn.post_nms_top_n() depends on .training
    if isinstance(model, MaskRCNN):
        counts["mask_head"] = model.roi_heads.detections_per_img
    return counts


def forward_flops(model: nn.Module, size: tuple[int, int]) -> dict[str, int]:
    """Forward FLOPs of one image per AGVM module, and ``"total"``, on the model's device.

    Args:
        size: (height, width) of the network input, i.e. after the detector's resize; it is padded
            to a multiple of 32 as ``GeneralizedRCNNTransform`` does.

    The R-CNN heads are counted at the RoI numbers of ``roi_counts`` (their inference maximum).
    """
    device = next(model.parameters()).device
    height, width = (math.ceil(s / 32) * 32 for s in size)
    rois = roi_counts(model)
    flops: dict[str, int] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        image = torch.zeros(1, 3, height, width, device=device)
        features, flops["backbone"] = _count(model.backbone.forward_body, image)
        pyramid, flops["fpn"] = _count(model.backbone.fpn, OrderedDict((str(i), f) for i, f in enumerate(features)))
        levels = list(pyramid.values())
        if isinstance(model, RetinaNet):
            flops["cls_head"] = _count(model.head.classification_head, levels)[1]
            flops["reg_head"] = _count(model.head.regression_head, levels)[1]
        else:
            heads = model.roi_heads
            flops["rpn"] = _count(model.rpn.head, levels)[1]
            pooled = _pooled(rois["roi_box_head"], model.backbone.out_channels, heads.box_roi_pool, device)
            flops["roi_box_head"] = _count(lambda x: heads.box_predictor(heads.box_head(x)), pooled)[1]
            if "mask_head" in rois:
                pooled = _pooled(rois["mask_head"], model.backbone.out_channels, heads.mask_roi_pool, device)
                flops["mask_head"] = _count(lambda x: heads.mask_predictor(heads.mask_head(x)), pooled)[1]
    model.train(was_training)
    flops["total"] = sum(flops.values())
    return flops


def _count(fn: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return out, counter.get_total_flops()


def _pooled(rois: int, channels: int, pool: nn.Module, device: torch.device) -> torch.Tensor:
    return torch.zeros(rois, channels, *pool.output_size, device=device)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="agvm-model-info",
        description="Parameters and forward FLOPs of a detector, per AGVM module.",
    )
    parser.add_argument("model", help="a name in models/ (e.g. faster_rcnn_r50_fpn) or a path to a YAML file")
    parser.add_argument(
        "--size", type=int, nargs="+", metavar="S",
        help="network input size: H W, or S for S x S (default: smallest min_size x max_size)",
    )
    parser.add_argument("--meta", action="store_true", help="build on the meta device: no memory, no weights (huge models)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec key (dotted for nested keys; VALUE is YAML), e.g. --set num_classes=5",
    )
    _add_plan_arguments(parser.add_argument_group("memory plan (--plan)"))
    args = parser.parse_args(argv)
    if args.size is not None and len(args.size) not in (1, 2):
        parser.error("--size takes H W or a single S")
    if args.ds_config and (args.stage or args.precision or args.offload or args.offload_param):
        parser.error("--ds-config sets the stage, precision and offload: give it or --stage/--precision/--offload")
    return args


def _add_plan_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--plan", action="store_true",
                       help="print the GPU (and host) memory per rank for training, instead of parameters and FLOPs")
    group.add_argument("--world", type=int, nargs="+", default=[8], metavar="N", help="data-parallel ranks (default 8)")
    group.add_argument("--stage", type=int, nargs="+", metavar="S", help="ZeRO stages 0-3 (default 2)")
    group.add_argument("--ds-config", nargs="+", metavar="CONFIG",
                       help="DeepSpeed configs (ds_configs/ names or paths): stage, precision, offload and bucket "
                            "sizes from each, instead of --stage/--precision/--offload and DeepSpeed's default buckets")
    group.add_argument("--precision", help=f"one of {list(memory.PRECISIONS)} (default autocast-bf16)")
    group.add_argument("--optimizer", default="adamw", help=f"one of {list(memory.OPTIMIZER_MOMENTS)} (default adamw)")
    group.add_argument("--offload", help="offload_optimizer device: none (default), cpu or nvme")
    group.add_argument("--offload-param", help="ZeRO-3 offload_param device: none (default), cpu or nvme")
    group.add_argument("--images", type=int, nargs="+", default=[1], metavar="N", help="images per GPU (default 1)")
    group.add_argument("--checkpointing", nargs="+", choices=["on", "off"],
                       help="backbone activation checkpointing (default: the model's)")
    group.add_argument("--gpu-memory", type=float, nargs="+", default=[80.0], metavar="GIB",
                       help="GPU memory to check the plan against (default 80)")
    group.add_argument("--reserve", type=float, default=2.0, metavar="GIB",
                       help="memory outside the plan: CUDA context, NCCL/cuBLAS buffers, fragmentation (default 2)")
    group.add_argument("--gpus-per-node", type=int, default=8, help="for DeepSpeed's estimator (default 8)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    try:
        spec = load_spec(args.model, parse_overrides(args.overrides))
    except (FileNotFoundError, ValueError) as error:
        print(f"agvm-model-info: {error}", file=sys.stderr)
        return 2
    if args.size is None:
        min_sizes = spec.min_size if isinstance(spec.min_size, tuple) else (spec.min_size,)
        size = (min(min_sizes), spec.max_size)
    else:
        size = (args.size[0], args.size[-1])
    if args.plan:
        return _print_plan(args, spec, size)
    device = "meta" if args.meta else "cpu"
    model = build_detector(spec, device=device)
    params = parameter_counts(model)
    trainable = parameter_counts(model, trainable_only=True)
    flops = forward_flops(model, size)
    height, width = (math.ceil(s / 32) * 32 for s in size)

    print(f"{spec.name or args.model}: {spec.detector}, backbone {spec.backbone}, "
          f"{spec.num_classes} classes (incl. background), built on {device}")
    print(f"{'module':<14}{'params':>16}{'trainable':>16}{'GFLOPs':>12}")
    for module, count in params.items():
        print(f"{module:<14}{count:>16,}{trainable.get(module, 0):>16,}{flops.get(module, 0) / 1e9:>12.2f}")
    print(
        f"FLOPs: one forward of one image at the network input {height}x{width} (after resize, padded to 32)"
        + "".join(f"; {module} at {n} RoIs" for module, n in roi_counts(model).items())
        + ". Not counted: resize/normalisation, anchors, box decoding, NMS, RoIAlign."
    )
    return 0


def _print_plan(args: argparse.Namespace, spec: ModelSpec, size: tuple[int, int]) -> int:
    """Prints the memory plan table; bad input is one error line and exit status 2."""
    try:
        setups = [setup for per_world in zip(*(_setups(args, world) for world in args.world)) for setup in per_world]
        if min(args.images) < 1 or min(args.gpu_memory) <= 0 or args.reserve < 0:
            raise ValueError(f"--images {args.images}, --gpu-memory {args.gpu_memory}, --reserve {args.reserve}: "
                             "expected images >= 1, GPU memory > 0 and a reserve >= 0")
    except (FileNotFoundError, ValueError) as error:
        print(f"agvm-model-info: {error}", file=sys.stderr)
        return 2
    checkpointing = [c == "on" for c in args.checkpointing] if args.checkpointing else [spec.checkpointing]
    stats = memory.param_stats(build_detector(spec, device="meta"))
    rows = memory.plan(spec, setups, args.images, size, checkpointing, args.gpus_per_node, stats)
    height, width = (math.ceil(s / 32) * 32 for s in size)
    offload = [f"{s.offload_optimizer}/{s.offload_param}" for s in setups]
    print(f"{spec.name or args.model}: {stats.trainable:,} trainable parameters ({stats.frozen:,} frozen), "
          f"{height}x{width} input, {args.optimizer}, precision {_distinct(s.precision for s in setups)}, "
          f"offload optimizer/params {_distinct(offload)}")
    print(memory.format_plan(rows, args.gpu_memory, args.reserve))
    return 0


def _distinct(values: Iterable[str]) -> str:
    return "/".join(dict.fromkeys(values))


def _setups(args: argparse.Namespace, world: int) -> list[memory.ZeroSetup]:
    if args.ds_config:
        return [memory.ZeroSetup.from_ds_config(_read_ds_config(name), world, args.optimizer)
                for name in args.ds_config]
    return [memory.ZeroSetup(stage=stage, world=world, precision=args.precision or "autocast-bf16",
                             optimizer=args.optimizer, offload_optimizer=args.offload or "none",
                             offload_param=args.offload_param or "none") for stage in args.stage or [2]]


def _read_ds_config(name: str) -> dict:
    path = find("ds_configs", name)
    if path is None:
        raise ValueError(f"--ds-config {name!r}: not a shipped DeepSpeed config nor a file; "
                         f"shipped: {shipped_names('ds_configs')}")
    with open(path) as handle:
        return json.load(handle)


if __name__ == "__main__":
    sys.exit(main())
