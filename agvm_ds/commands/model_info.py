"""``agvm-model-info``: parameters and forward FLOPs of a detector or segmenter per AGVM module, or
with ``--plan`` the memory one GPU needs to train it (see :mod:`agvm_ds.detection.memory`).

    agvm-model-info faster_rcnn_swinv2_1b_fpn --meta
    agvm-model-info upernet_swinv2_1b --meta --size 512
    agvm-model-info faster_rcnn_swinv2_1b_fpn --plan --world 8 64 512 --ds-config zero3_bf16_swin1b
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Iterable, Optional, Sequence

from ..config_checks import parse_overrides
from ..detection import ModelSpec, build_detector, load_spec, memory
from ..detection.summary import forward_flops, parameter_counts, roi_counts, training_only_modules
from ..errors import add_exit_codes, run_command
from ..resources import find, shipped_names

__all__ = ["main"]


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="agvm-model-info",
        description="Parameters and forward FLOPs of a detector or segmenter, per AGVM module.",
    )
    parser.add_argument("model", help="a name in models/ (e.g. faster_rcnn_r50_fpn) or a path to a YAML file")
    parser.add_argument(
        "--size", type=int, nargs="+", metavar="S",
        help="network input size: H W, or S for S x S (default: smallest min_size x max_size)",
    )
    parser.add_argument("--meta", action="store_true",
                        help="build on the meta device: no memory, no weights (huge models)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec key (dotted for nested keys; VALUE is YAML), e.g. --set num_classes=5",
    )
    _add_plan_arguments(parser.add_argument_group("memory plan (--plan)"))
    args = add_exit_codes(parser).parse_args(argv)
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
    return run_command("agvm-model-info", lambda: _model_info(args))


def _model_info(args: argparse.Namespace) -> int:
    spec = load_spec(args.model, parse_overrides(args.overrides))
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
          f"{class_counts(spec)}, built on {device}")
    print(f"{'module':<14}{'params':>16}{'trainable':>16}{'GFLOPs':>12}")
    for module, count in params.items():
        print(f"{module:<14}{count:>16,}{trainable.get(module, 0):>16,}{flops.get(module, 0) / 1e9:>12.2f}")
    print(
        f"FLOPs: one forward of one image at the network input {height}x{width} (after resize, padded to 32)"
        + "".join(f"; {module} at {n} RoIs" for module, n in roi_counts(model).items())
        + "".join(f"; {module} runs in training only" for module in training_only_modules(model))
        + f". Not counted: {_NOT_COUNTED[spec.task]}."
    )
    return 0


#: What ``forward_flops`` leaves out, per task.
_NOT_COUNTED = {
    "detection": "resize/normalisation, anchors, box decoding, NMS, RoIAlign",
    "instance": "resize/normalisation, anchors, box decoding, NMS, RoIAlign, mask pasting",
    "semantic": "resize/normalisation, upsampling the logits to the image, argmax",
    "panoptic": "resize/normalisation, anchors, box decoding, NMS, RoIAlign, mask pasting, upsampling the "
                "semantic logits, the panoptic merge",
}


def class_counts(spec: ModelSpec) -> str:
    """The class counts of ``spec`` in the words of its task: detectors count a background class,
    semantic models do not, Panoptic FPN's semantic head adds one "thing" class to the stuff classes."""
    if spec.task == "semantic":
        return f"{spec.num_classes} classes (no background)"
    if spec.task == "panoptic":
        return (f"{spec.num_classes} thing classes (incl. background), {spec.num_stuff_classes} stuff classes "
                f"(semantic head: + 1 'thing' class)")
    return f"{spec.num_classes} classes (incl. background)"


def _print_plan(args: argparse.Namespace, spec: ModelSpec, size: tuple[int, int]) -> int:
    """Prints the memory plan table; bad input raises ValueError (one error line and exit status 2)."""
    setups = [setup for per_world in zip(*(_setups(args, world) for world in args.world)) for setup in per_world]
    if min(args.images) < 1 or min(args.gpu_memory) <= 0 or args.reserve < 0:
        raise ValueError(f"--images {args.images}, --gpu-memory {args.gpu_memory}, --reserve {args.reserve}: "
                         "expected images >= 1, GPU memory > 0 and a reserve >= 0")
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
