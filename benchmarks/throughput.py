"""Training throughput of agvm-ds, side by side with a plain PyTorch loop on the same detector.

    python benchmarks/throughput.py --model faster_rcnn_r50_fpn --size 800 1333 --images-per-gpu 8 16 \\
        --precision bf16 --zero-stage 2 --steps 50 --json r50.json          # one GPU (a world of one)
    deepspeed --num_gpus 8 benchmarks/throughput.py --model ...              # N ranks, same flags
    python benchmarks/throughput.py --device cpu --steps 3                   # CPU smoke run, tiny model

Variants, built from the same initial weights and run in interleaved rounds (``timing.py``):

    plain     the torchvision detector trained by a plain loop: the same torch.optim optimizer over the
              same param groups, torch.autocast, gradient accumulation, the same clipping; DDP when
              there is more than one rank. No DeepSpeed, no AGVM.
    agvm_off  agvm_ds.initialize (DeepSpeed + the AGVM wrapper) as the trainer builds it, AGVM disabled
    agvm_10   AGVM statistics every 10 steps (the paper's interval), from step 0
    agvm_1    AGVM statistics every step (the worst case)

The agvm-ds variants run ``StepRunner.run_step`` (``agvm_ds/engine/step.py``), the trainer's own step:
forward, the non-finite-loss guard (a device flag all-reduced per micro-batch, one host read per
optimizer step), backward and DeepSpeed step per micro-batch; only logging and checkpoints are not
timed. Inputs are synthetic: random images of exactly ``--size`` (the model's resize is
skipped; the transform still normalises and pads to 32) with 8 random boxes each (and box masks for
Mask R-CNN), made on the device before timing, so no data loading is timed. AGVM needs at least two
micro-batch gradients per step to measure anything, hence ``--accumulation 2`` by default on one rank.

Printed (and written with ``--json``, rewritten after each size), for each number of images per GPU
(several make a sweep in one process, which stops at the first that runs out of memory): medians
over ``--steps`` timed rounds after ``--warmup`` of images/s per GPU and step time; peak CUDA memory
(max_memory_allocated/reserved during the variant's steps, which includes the other variants'
resident weights and optimizer states: use ``--variants`` for one variant's own peak); MFU = 3 x forward
FLOPs per image (``agvm_ds.detection.summary``'s counting; activation recomputation not counted) x images/s / the
GPU's dense bf16 peak; and paired ratios with 95% confidence intervals: images/s agvm-ds / plain, step time
AGVM on / AGVM off.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from timing import Ratio, interleaved_times, paired_ratio
from torch import nn

from agvm_ds import AGVMConfig
from agvm_ds.config_checks import apply_overrides
from agvm_ds.detection import build_detector, load_spec
from agvm_ds.detection.summary import forward_flops
from agvm_ds.engine.builders import build_step_runner
from agvm_ds.engine.config import ExperimentConfig, load_config
from agvm_ds.engine.deepspeed_config import deepspeed_config
from agvm_ds.engine.distributed import single_process_world
from agvm_ds.engine.optim import build_optimizer
from agvm_ds.engine.schedule import lr_multiplier, peak_lr
from agvm_ds.engine.step import MicroBatch, StepRunner

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain": "plain PyTorch loop",
    "agvm_off": "agvm-ds, AGVM off",
    "agvm_10": "agvm-ds, AGVM every 10",
    "agvm_1": "agvm-ds, AGVM every 1",
}
AGVM_INTERVALS = {"agvm_10": 10, "agvm_1": 1}
BOXES_PER_IMAGE = 8
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from NVIDIA's data sheets; matched in order
# against torch.cuda.get_device_name().
DENSE_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H200", 989.0),
    ("A100", 312.0),
)
OOM_EXIT_CODE = 3


@dataclass(frozen=True)
class Settings:
    """What one benchmark run measures; every variant shares it."""

    config: ExperimentConfig
    size: tuple[int, int]
    images_per_gpu: tuple[int, ...]  # ascending: a sweep stops at the first size that runs out of memory
    accumulation: int
    precision: str
    zero_stage: int
    steps: int
    warmup: int


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="experiment YAML whose model, optimizer, AGVM and DeepSpeed settings to use "
                                         "(default: the built-in defaults with ds_configs/zero<S>_bf16.json)")
    parser.add_argument("--model", help="a name in models/ (default: the experiment's model)")
    parser.add_argument("--size", type=int, nargs="+", metavar="S",
                        help="image size H W (or S for S x S); default: the model's min_size x max_size")
    parser.add_argument("--images-per-gpu", type=int, nargs="+", metavar="N",
                        help="images per micro-batch per GPU; several: a sweep in one process, in ascending order, "
                             "up to the first that runs out of memory (default: the experiment's)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16: torch.autocast bf16 with fp32 weights (the ds_configs' bf16); fp32: no autocast")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    parser.add_argument("--steps", type=int, default=50,
                        help="timed rounds (each variant one optimizer step per round)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: DeepSpeed's accelerator")
    parser.add_argument("--peak-tflops", type=float,
                        help="dense bf16 peak of the device for MFU (default: looked up from the GPU's name)")
    parser.add_argument("--json", type=Path, help="also write the results here (rank 0)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="experiment overrides, as agvm-train takes them "
                             "(e.g. model_overrides.checkpointing=false)")
    args = parser.parse_args(argv)
    if args.size is not None and len(args.size) not in (1, 2):
        parser.error("--size takes H W or a single S")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; valid: {list(VARIANTS)}")
    for flag in ("accumulation", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)}: expected >= 1")
    if args.images_per_gpu is not None and min(args.images_per_gpu) < 1:
        parser.error(f"--images-per-gpu {args.images_per_gpu}: expected sizes >= 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = list(args.overrides)
    if args.config is None:
        overrides.insert(0, f"deepspeed={REPO / 'ds_configs' / f'zero{args.zero_stage}_bf16.json'}")
    if args.model is not None:
        overrides.append(f"model={args.model}")
    if args.images_per_gpu is not None:
        overrides.append(f"data.batch_size_per_rank={min(args.images_per_gpu)}")
    overrides.append(f"train.gradient_accumulation_steps={args.accumulation}")
    overrides.append("data.dataset=synthetic")  # the inputs are made here: no data set is read or checked
    config = load_config(args.config, overrides)
    spec = load_spec(config.model, config.model_overrides)
    if args.size is None:
        min_sizes = spec.min_size if isinstance(spec.min_size, tuple) else (spec.min_size,)
        size = (min(min_sizes), spec.max_size)
    else:
        size = (args.size[0], args.size[-1])
    images_per_gpu = tuple(sorted(set(args.images_per_gpu or [config.data.batch_size_per_rank])))
    return Settings(config, size, images_per_gpu, args.accumulation, args.precision, args.zero_stage,
                    args.steps, args.warmup)


def ds_config_for(settings: Settings) -> dict[str, Any]:
    """The trainer's DeepSpeed config with the benchmark's stage and precision, and no monitors
    (nothing is written to disk inside the timed loop)."""
    return apply_overrides(deepspeed_config(settings.config), {
        "zero_optimization": {"stage": settings.zero_stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": settings.precision == "bf16", "dtype": "bfloat16"},
        "csv_monitor": {"enabled": False},
        "tensorboard": {"enabled": False},
    })


def synthetic_micro_batches(spec, settings: Settings, images_per_gpu: int, device: torch.device,
                            seed: int) -> list[MicroBatch]:
    """One optimizer step's micro-batches of random images with random boxes, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    height, width = settings.size
    with_masks = spec.detector == "mask_rcnn"
    batches = []
    for _ in range(settings.accumulation):
        images, targets = [], []
        for _ in range(images_per_gpu):
            images.append(torch.rand(3, height, width, generator=generator).to(device))
            extent = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * 0.3 + 0.05  # of the image side
            corner = torch.rand(BOXES_PER_IMAGE, 2, generator=generator) * (1 - extent)
            scale = torch.tensor([width, height], dtype=torch.float32)
            boxes = torch.cat([corner * scale, (corner + extent) * scale], dim=1)
            labels = torch.randint(1, spec.num_classes, (BOXES_PER_IMAGE,), generator=generator)
            target = {"boxes": boxes, "labels": labels}
            if with_masks:
                masks = torch.zeros(BOXES_PER_IMAGE, height, width, dtype=torch.uint8)
                for mask, (x1, y1, x2, y2) in zip(masks, boxes.round().int().tolist()):
                    mask[y1:y2, x1:x2] = 1
                target["masks"] = masks
            targets.append({k: v.to(device) for k, v in target.items()})
        batches.append(MicroBatch(images, targets))
    return batches


class PlainLoop:
    """What a user would run instead: the detector, a torch.optim optimizer, torch.autocast,
    ``loss / accumulation`` backward, clipping, step; DistributedDataParallel across ranks."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, clip: float,
                 autocast: bool, device: torch.device, world: int) -> None:
        self.model = model.to(device).train()
        if world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer, self.scheduler, self.clip = optimizer, scheduler, clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast, self.device_type = autocast, device.type

    def __call__(self, micro_batches: list[MicroBatch]) -> None:
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            is_ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
            no_sync = self.model.no_sync() if is_ddp and not last else nullcontext()
            with no_sync:
                with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss = sum(self.model(batch.images, batch.targets).values())
                (loss / len(micro_batches)).backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def engine_step(runner: StepRunner) -> Callable[[list[MicroBatch]], None]:
    """One optimizer step of an agvm-ds engine, exactly as the trainer takes it."""

    def step(micro_batches: list[MicroBatch]) -> None:
        if not runner.run_step(micro_batches).stepped:
            raise RuntimeError("the micro-batches of a round did not complete an optimizer step (a non-finite loss?)")

    return step


def build_variants(names: Sequence[str], settings: Settings, device: torch.device, world: int):
    """The step function of each variant, and the AGVM optimizer of each agvm-ds variant."""
    config = settings.config
    torch.manual_seed(config.seed)
    model = build_detector(load_spec(config.model, config.model_overrides), resize_in_model=False)  # inputs at size
    ds_config = ds_config_for(settings)
    global_batch = settings.images_per_gpu[0] * settings.accumulation * world  # sets the lr only
    lr = peak_lr(config.optimizer, global_batch)
    schedule = lr_multiplier(config.schedule, settings.warmup + settings.steps)
    steps, optimizers = {}, {}
    for name in names:
        replica = copy.deepcopy(model)
        if name == "plain":
            # the same torch.optim optimizer over the same param groups, without the AGVM wrapper
            base = build_optimizer(replica, replica.agvm_modules, config.optimizer, lr, config.agvm).base_optimizer
            scheduler = torch.optim.lr_scheduler.LambdaLR(base, schedule)
            steps[name] = PlainLoop(replica, base, scheduler, ds_config.get("gradient_clipping", 0.0),
                                    settings.precision == "bf16", device, world)
            continue
        agvm_config = AGVMConfig.from_dict({
            **config.agvm.to_dict(), "enabled": name != "agvm_off", "start_iter": 0,
            "interval": AGVM_INTERVALS.get(name, config.agvm.interval), "stop_iter": None,
        })
        optimizer = build_optimizer(replica, replica.agvm_modules, config.optimizer, lr, agvm_config)
        skips = config.train.max_consecutive_skips if config.train.skip_nonfinite_loss else None
        runner = build_step_runner(replica, optimizer, ds_config, schedule, skips)
        steps[name], optimizers[name] = engine_step(runner), optimizer
    return steps, optimizers


def with_peak_memory(step: Callable[[Any], None], peaks: dict[str, int]) -> Callable[[Any], None]:
    """``step``, recording the CUDA allocator's peak allocated and reserved bytes during it."""

    def measured(inputs: Any) -> None:
        torch.cuda.reset_peak_memory_stats()
        step(inputs)
        peaks["allocated"] = max(peaks.get("allocated", 0), torch.cuda.max_memory_allocated())
        peaks["reserved"] = max(peaks.get("reserved", 0), torch.cuda.max_memory_reserved())

    return measured


def dense_bf16_peak(device: torch.device, given_tflops: Optional[float]) -> tuple[Optional[float], str]:
    """The peak FLOP/s that MFU divides by, and where it came from."""
    if given_tflops is not None:
        return given_tflops * 1e12, f"{given_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "n/a on CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in DENSE_BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"{tflops:g} TFLOP/s dense bf16 ({key}, from NVIDIA's data sheet)"
    return None, f"unknown for {name!r} (give --peak-tflops)"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def check_agvm_can_measure(names: Sequence[str], settings: Settings, world: int) -> None:
    """An AGVM variant on a single micro-batch gradient per step would time a no-op."""
    if any(name in AGVM_INTERVALS for name in names) and world * settings.accumulation < 2:
        raise ValueError("AGVM needs at least 2 micro-batch gradients per step to measure anything: "
                         "use --accumulation 2 or more ranks")


def run(settings: Settings, names: Sequence[str], device: torch.device, peak_tflops: Optional[float],
        on_size_done: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Builds the variants once, then times them at each number of images per GPU; ``on_size_done``
    gets the result so far after each size (so a sweep cut off by a time limit keeps what it measured)."""
    import deepspeed.comm as dist

    world = dist.get_world_size()
    check_agvm_can_measure(names, settings, world)
    config = settings.config
    spec = load_spec(config.model, config.model_overrides)
    flops = forward_flops(build_detector(spec, device="meta"), settings.size)["total"]
    peak, peak_source = dense_bf16_peak(device, peak_tflops)
    steps, optimizers = build_variants(names, settings, device, world)
    result = {
        "device": device_description(device),
        "world_size": world,
        "model": config.model,
        "model_overrides": config.model_overrides,
        "size": list(settings.size),
        "accumulation": settings.accumulation,
        "precision": "autocast bf16, fp32 weights" if settings.precision == "bf16" else "fp32",
        "zero_stage": settings.zero_stage,
        "optimizer": config.optimizer.name,
        "steps": settings.steps,
        "warmup": settings.warmup,
        "forward_gflops_per_image": flops / 1e9,
        "peak_flops": peak,
        "peak_source": peak_source,
        "versions": {"torch": torch.__version__, "deepspeed": _version("deepspeed"),
                     "python": platform.python_version()},
        "runs": [],
    }
    for images_per_gpu in settings.images_per_gpu:
        try:
            result["runs"].append(measure(steps, optimizers, settings, images_per_gpu, spec, device, flops, peak))
        except torch.OutOfMemoryError as error:
            result["runs"].append({"images_per_gpu": images_per_gpu, "oom": str(error).splitlines()[0]})
        result["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        on_size_done(result)
        if "oom" in result["runs"][-1]:
            break
    return result


def measure(steps: dict[str, Callable[[list[MicroBatch]], None]], optimizers: dict[str, Any], settings: Settings,
            images_per_gpu: int, spec, device: torch.device, flops: float, peak: Optional[float]) -> dict[str, Any]:
    """Interleaved rounds of every variant at ``images_per_gpu``: medians, memory, MFU, paired ratios."""
    import deepspeed.comm as dist

    world = dist.get_world_size()
    peaks: dict[str, dict[str, int]] = {name: {} for name in steps}
    if device.type == "cuda":
        steps = {name: with_peak_memory(step, peaks[name]) for name, step in steps.items()}
    seed = settings.config.seed * 1000 + dist.get_rank() * 10
    pool = [synthetic_micro_batches(spec, settings, images_per_gpu, device, seed + i) for i in range(2)]
    first_timed = {name: agvm.iteration + settings.warmup for name, agvm in optimizers.items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()

    times = interleaved_times(steps, inputs=lambda r: pool[r % len(pool)], rounds=settings.steps,
                              warmup=settings.warmup, sync=sync)
    variants = {}
    for name in steps:
        step_time = statistics.median(times[name])
        images_per_s = images_per_gpu * settings.accumulation / step_time
        row: dict[str, Any] = {
            "label": VARIANTS[name],
            "step_time_s": step_time,
            "images_per_s_per_gpu": images_per_s,
            "images_per_s_total": images_per_s * world,
            "mfu": 3 * flops * images_per_s / peak if peak else None,
            "peak_allocated_gib": peaks[name]["allocated"] / 2**30 if peaks[name] else None,
            "peak_reserved_gib": peaks[name]["reserved"] / 2**30 if peaks[name] else None,
            "step_times_s": times[name],
        }
        if name in optimizers:
            agvm = optimizers[name]
            timed = range(first_timed[name], first_timed[name] + settings.steps)
            row["agvm_stats_steps_timed"] = sum(agvm.config.is_stats_iter(it) for it in timed)
            row["agvm_statistics"] = agvm.statistics()
        if name != "plain" and "plain" in steps:
            row["images_per_s_vs_plain"] = _as_dict(paired_ratio(times["plain"], times[name]))
        if name in AGVM_INTERVALS and "agvm_off" in steps:
            row["step_time_vs_agvm_off"] = _as_dict(paired_ratio(times[name], times["agvm_off"]))
        variants[name] = row
    return {"images_per_gpu": images_per_gpu, "variants": variants}


def _as_dict(ratio: Ratio) -> dict[str, float]:
    return {"mean": ratio.mean, "half_width_95": ratio.half_width}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def format_report(result: dict[str, Any]) -> str:
    """The table a person reads; the JSON carries the same numbers and every step time."""
    height, width = result["size"]
    lines = [
        f"device: {result['device']}; {result['world_size']} rank(s); torch {result['versions']['torch']}, "
        f"deepspeed {result['versions']['deepspeed']}",
        f"model {result['model']}{_overrides_text(result['model_overrides'])} at {height}x{width}, "
        f"{result['accumulation']} micro-batches per step, {result['precision']}, ZeRO-{result['zero_stage']}, "
        f"{result['optimizer']}; "
        f"medians over {result['steps']} rounds after {result['warmup']} warm-up rounds",
        f"forward {result['forward_gflops_per_image']:.1f} GFLOPs/image (agvm_ds.detection.summary; heads at their "
        f"inference RoI numbers); MFU = 3 x that x images/s / peak; peak used: {result['peak_source']}",
        "inputs: synthetic images and boxes made on the device before timing (no data loading timed)",
        "",
        f"{'img/GPU':>7}  {'variant':<24}{'images/s/GPU':>13}{'step s':>9}{'vs plain (95% CI)':>20}{'MFU':>7}"
        f"{'peak alloc GiB':>16}{'peak reserved GiB':>19}",
    ]
    overheads, on_cuda = [], False
    for run_result in result["runs"]:
        images = run_result["images_per_gpu"]
        if "oom" in run_result:
            lines.append(f"{images:>7}  out of memory: {run_result['oom']}")
            continue
        for row in run_result["variants"].values():
            on_cuda = on_cuda or row["peak_allocated_gib"] is not None
            lines.append(
                f"{images:>7}  {row['label']:<24}{row['images_per_s_per_gpu']:>13.2f}{row['step_time_s']:>9.4f}"
                f"{_ratio_text(row.get('images_per_s_vs_plain')):>20}{_optional(row['mfu'], '{:.1%}'):>7}"
                f"{_optional(row['peak_allocated_gib'], '{:.2f}'):>16}"
                f"{_optional(row['peak_reserved_gib'], '{:.2f}'):>19}"
            )
            if "step_time_vs_agvm_off" in row:
                overheads.append(f"AGVM overhead at {images} images/GPU, {row['label']} / AGVM off: step time "
                                 f"{_ratio_text(row['step_time_vs_agvm_off'])} ({row['agvm_stats_steps_timed']} "
                                 f"statistics steps among the {result['steps']} timed)")
    lines += overheads
    if on_cuda:
        lines.append("memory: peaks during each variant's steps include the other variants' resident states")
    else:
        lines.append(f"memory: no CUDA allocator on this device; process peak RSS {result['max_rss_gib']:.2f} GiB")
    return "\n".join(lines)


def _overrides_text(overrides: dict[str, Any]) -> str:
    return "".join(f" {key}={value}" for key, value in overrides.items())


def _ratio_text(ratio: Optional[dict[str, float]]) -> str:
    return "-" if ratio is None else f"{ratio['mean']:.3f} +- {ratio['half_width_95']:.3f}"


def _optional(value: Optional[float], fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"throughput: {error}", file=sys.stderr)
        return 2
    single_process_world()
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    if args.device is not None and args.device != accelerator:
        print(f"throughput: --device {args.device}, but DeepSpeed's accelerator is {accelerator!r} "
              f"(set DS_ACCELERATOR={args.device})", file=sys.stderr)
        return 2
    deepspeed.init_distributed(verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(get_accelerator().device_name(local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    names = [name for name in VARIANTS if name in args.variants.split(",")]
    is_main = dist.get_rank() == 0

    def write_json(result: dict[str, Any]) -> None:
        if is_main and args.json:
            args.json.write_text(json.dumps(result, indent=2))

    try:
        result = run(settings, names, device, args.peak_tflops, on_size_done=write_json)
    except torch.OutOfMemoryError as error:  # building the variants: the model states alone do not fit
        print(f"throughput: out of memory on rank {dist.get_rank()} before the first step, with "
              f"{len(names)} variant(s) resident: {str(error).splitlines()[0]}", file=sys.stderr)
        return OOM_EXIT_CODE
    except ValueError as error:
        print(f"throughput: {error}", file=sys.stderr)
        return 2
    if is_main:
        print(format_report(result))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
