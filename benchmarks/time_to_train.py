"""Projected wall-clock time of 12 COCO epochs on 8 to 1,024 GPUs, from per-GPU throughput inputs.

    python benchmarks/time_to_train.py --from-json r50_8.json --from-json swin1b_4.json   # throughput.py outputs
    python benchmarks/time_to_train.py --throughput faster_rcnn_r50_fpn=8:52 \\
        --throughput faster_rcnn_swinv2_1b_fpn=4:10             # MODEL=IMAGES_PER_GPU:IMAGES_PER_S
    python benchmarks/time_to_train.py --goal-placeholders        # target figures in place of measurements

A projection, not a measurement: every figure follows from the throughput inputs (each printed with
its source) and from the communication model below, whose assumptions are printed with the tables.

Per optimizer step, on the busiest of N GPUs (global batch B, so L = ceil(B / N) images each):
  compute    L / r, with r the per-GPU images/s measured at the micro-batch m (the largest measured
             m <= L), in ceil(L / m) micro-steps; r includes one GPU's full optimizer step, of which
             ZeRO-2 runs 1/N on N GPUs (ignored: conservative)
  ZeRO-2     DeepSpeed reduce-scatters the gradients (P x grad bytes) on every micro-step and
             all-gathers the updated parameters (P x param bytes) once per step; P = trainable parameters
  collective hierarchical ring over K GPUs per node and N / K nodes, per GPU:
             (K-1)/K x S / NVLink  +  (N/K-1)/(N/K) x S / K / InfiniBand  +  (K-1 + N/K-1) hops x latency
             per bucket of at most ``--bucket-elements`` parameters
  overlap    off: step = compute + micro-steps x reduce-scatter + all-gather
             on (--overlap): each micro-step's reduce-scatter hides behind its backward (2/3 of its
             compute): step = sum over micro-steps of (compute/3 + max(2 compute/3, reduce-scatter)) + all-gather
  run        epochs x floor(118,287 / B) steps (the trainer drops the last partial batch); no data
             loading, evaluation or checkpoint time
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

COCO_TRAIN_IMAGES = 118_287
EPOCHS = 12
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512, 768, 1024)
PLACEHOLDER = "PLACEHOLDER, awaiting measurement"


@dataclass(frozen=True)
class Workload:
    """A model trained at a fixed global batch, the paper's figure to compare with, and the target
    throughput goal (images/s or MFU per H100 at a number of images per GPU)."""

    model: str
    global_batch: int
    size: tuple[int, int]
    paper: str
    goal_images_per_gpu: int
    goal_images_per_s: Optional[float] = None
    goal_mfu: Optional[float] = None


WORKLOADS = (
    Workload("faster_rcnn_r50_fpn", 1536, (800, 1333),
             "paper: Faster R-CNN R50-FPN, batch 1536, 12 epochs: 4.2 min on 768 A100 (36.6 mAP)",
             goal_images_per_gpu=8, goal_images_per_s=50.0),
    Workload("faster_rcnn_swinv2_1b_fpn", 960, (1024, 1024),
             "paper: a different ~1B detector (UniNet-G), batch 960: 3.5 h (62.2 mAP); its GPU count and "
             "epochs were not found in the paper's readable parts",
             goal_images_per_gpu=4, goal_mfu=0.35),
)


@dataclass(frozen=True)
class Throughput:
    """Per-GPU training images/s measured (or assumed) at ``images_per_gpu`` images per micro-batch."""

    images_per_gpu: int
    images_per_s: float
    source: str


@dataclass(frozen=True)
class Network:
    """Per-GPU bandwidths (one direction) and the latency of one ring step."""

    gpus_per_node: int = 8
    nvlink_gb_s: float = 450.0
    infiniband_gb_s: float = 50.0
    hop_latency_us: float = 5.0


@dataclass(frozen=True)
class Traffic:
    """What ZeRO-2 moves per step for a model."""

    parameters: int
    grad_bytes: int = 4
    param_bytes: int = 4
    bucket_elements: int = 500_000_000


@dataclass(frozen=True)
class StepEstimate:
    gpus: int
    images_per_gpu: int
    micro_steps: int
    compute_s: float
    reduce_scatter_s: float  # one micro-step's
    all_gather_s: float
    step_s: float
    run_s: float
    extrapolated: bool  # the throughput was measured at more images per micro-batch than this load

    @property
    def compute_share(self) -> float:
        return self.compute_s / self.step_s


def ring_collective_seconds(payload_bytes: float, gpus: int, network: Network, buckets: int) -> float:
    """A hierarchical ring reduce-scatter (or all-gather, the same cost) of ``payload_bytes``."""
    local = min(gpus, network.gpus_per_node)
    if gpus % local:
        raise ValueError(f"{gpus} GPUs is not a whole number of {network.gpus_per_node}-GPU nodes")
    nodes = gpus // local
    bandwidth = ((local - 1) / local * payload_bytes / (network.nvlink_gb_s * 1e9)
                 + (nodes - 1) / nodes * payload_bytes / local / (network.infiniband_gb_s * 1e9))
    latency = buckets * (local - 1 + nodes - 1) * network.hop_latency_us * 1e-6
    return bandwidth + latency


def pick_throughput(points: Sequence[Throughput], images_per_gpu: int) -> tuple[Throughput, bool]:
    """The measurement at the largest micro-batch that fits the per-GPU load (else the smallest one,
    flagged as extrapolated)."""
    fitting = [p for p in points if p.images_per_gpu <= images_per_gpu]
    if fitting:
        return max(fitting, key=lambda p: p.images_per_gpu), False
    return min(points, key=lambda p: p.images_per_gpu), True


def estimate_step(workload: Workload, gpus: int, points: Sequence[Throughput], traffic: Traffic,
                  network: Network, overlap: bool, epochs: int = EPOCHS,
                  dataset_images: int = COCO_TRAIN_IMAGES) -> Optional[StepEstimate]:
    """One row of the projection; None when the global batch has fewer images than there are GPUs."""
    if workload.global_batch < gpus:
        return None
    load = math.ceil(workload.global_batch / gpus)
    point, extrapolated = pick_throughput(points, load)
    micro_steps = math.ceil(load / point.images_per_gpu)
    compute = load / point.images_per_s
    buckets = math.ceil(traffic.parameters / traffic.bucket_elements)
    reduce_scatter = ring_collective_seconds(traffic.parameters * traffic.grad_bytes, gpus, network, buckets)
    all_gather = ring_collective_seconds(traffic.parameters * traffic.param_bytes, gpus, network, buckets)
    if overlap:
        per_micro = compute / micro_steps
        step = micro_steps * (per_micro / 3 + max(2 * per_micro / 3, reduce_scatter)) + all_gather
    else:
        step = compute + micro_steps * reduce_scatter + all_gather
    steps = epochs * (dataset_images // workload.global_batch)
    return StepEstimate(gpus, load, micro_steps, compute, reduce_scatter, all_gather, step, steps * step, extrapolated)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def format_assumptions(network: Network, overlap: bool, grad_bytes: int, param_bytes: int, bucket: int) -> str:
    return "\n".join([
        "Assumptions (a projection from the inputs below, not a measurement):",
        f"- {EPOCHS} epochs of COCO train2017 ({COCO_TRAIN_IMAGES:,} images), floor(images / batch) steps per epoch;"
        " no data loading, evaluation or checkpoint time; every GPU as fast as the one measured",
        "- per-GPU images/s of the input applies at every per-GPU load (it usually drops at 1-2 images per GPU);"
        " it includes a full optimizer step that ZeRO-2 splits N ways (ignored: conservative)",
        f"- ZeRO-2: reduce-scatter of the gradients ({grad_bytes} B/parameter) every micro-step, all-gather of the"
        f" parameters ({param_bytes} B/parameter) every step (fp32 under the ds_configs' bf16 autocast); buckets of"
        f" <= {bucket:,} parameters",
        f"- {network.gpus_per_node} GPUs per node; per GPU and direction NVLink {network.nvlink_gb_s:g} GB/s,"
        f" InfiniBand {network.infiniband_gb_s:g} GB/s; {network.hop_latency_us:g} us per ring step;"
        " hierarchical ring: intra-node then inter-node",
        "- communication overlapped with backward: " + (
            "yes (each micro-step's reduce-scatter behind its backward = 2/3 of its compute; the all-gather is not)"
            if overlap else "no (compute + all collectives, back to back)"),
    ])


def format_table(workload: Workload, parameters: int, points: Sequence[Throughput], rows: Sequence) -> str:
    lines = [
        f"{workload.model} at {workload.size[0]}x{workload.size[1]}, global batch {workload.global_batch}, "
        f"{parameters:,} trainable parameters",
        "throughput inputs: " + "; ".join(f"{p.images_per_s:g} images/s/GPU at {p.images_per_gpu} images/GPU "
                                          f"[{p.source}]" for p in points),
        f"{'GPUs':>6}{'img/GPU':>9}{'micro':>7}{'compute s':>11}{'RS s':>9}{'AG s':>9}{'step s':>9}"
        f"{'compute %':>11}{'12 epochs':>12}",
    ]
    for gpus, row in rows:
        if row is None:
            lines.append(f"{gpus:>6}  batch {workload.global_batch} < {gpus} GPUs")
            continue
        flag = " *" if row.extrapolated else ""
        lines.append(f"{gpus:>6}{row.images_per_gpu:>9}{row.micro_steps:>7}{row.compute_s:>11.4f}"
                     f"{row.reduce_scatter_s:>9.4f}{row.all_gather_s:>9.4f}{row.step_s:>9.4f}"
                     f"{row.compute_share:>11.1%}{format_duration(row.run_s):>12}{flag}")
    if any(row is not None and row.extrapolated for _, row in rows):
        lines.append("* measured at more images per micro-batch than this per-GPU load: optimistic")
    lines.append(workload.paper)
    return "\n".join(lines)


def throughput_from_json(path: Path) -> tuple[str, list[Throughput]]:
    """The agvm-ds (AGVM every 10, else AGVM off) per-GPU images/s at each number of images per GPU
    of a throughput.py result file (sizes that ran out of memory left out)."""
    result = json.loads(path.read_text())
    overrides = f" {result['model_overrides']}" if result.get("model_overrides") else ""
    points = []
    for run in result["runs"]:
        variant = next((run["variants"][v] for v in ("agvm_10", "agvm_off") if v in run.get("variants", {})), None)
        if variant is not None:
            source = (f"measured: {path.name}, {variant['label']}{overrides}, {result['device']}, "
                      f"{result['precision']}, ZeRO-{result['zero_stage']}")
            points.append(Throughput(run["images_per_gpu"], variant["images_per_s_per_gpu"], source))
    if not points:
        raise ValueError(f"{path}: no agvm_10 or agvm_off result that ran (out of memory, or other variants only)")
    return result["model"], points


def parse_throughput(text: str) -> tuple[str, Throughput]:
    """``MODEL=IMAGES_PER_GPU:IMAGES_PER_S``."""
    model, sep, rest = text.partition("=")
    images, colon, rate = rest.partition(":")
    try:
        if not (sep and colon):
            raise ValueError
        point = Throughput(int(images), float(rate), "given on the command line")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL=IMAGES_PER_GPU:IMAGES_PER_S") from None
    if point.images_per_gpu < 1 or point.images_per_s <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: images per GPU and images/s must be positive")
    return model, point


def goal_placeholder(workload: Workload, forward_flops: float, peak_flops: float) -> Throughput:
    """The target throughput for ``workload`` standing in for a measurement, labelled as such. An MFU goal
    becomes images/s = MFU x peak / (3 x forward FLOPs per image)."""
    if workload.goal_images_per_s is not None:
        return Throughput(workload.goal_images_per_gpu, workload.goal_images_per_s,
                          f"{PLACEHOLDER}: the target of {workload.goal_images_per_s:g} images/s per H100")
    images_per_s = workload.goal_mfu * peak_flops / (3 * forward_flops)
    return Throughput(workload.goal_images_per_gpu, images_per_s,
                      f"{PLACEHOLDER}: the target of {workload.goal_mfu:.0%} MFU = {workload.goal_mfu:g} x "
                      f"{peak_flops / 1e12:g} TFLOP/s / (3 x {forward_flops / 1e12:.2f} TFLOP forward per image)")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from-json", type=Path, action="append", default=[], metavar="PATH",
                        help="a benchmarks/throughput.py --json result (repeatable)")
    parser.add_argument("--throughput", type=parse_throughput, action="append", default=[],
                        metavar="MODEL=IMAGES_PER_GPU:IMAGES_PER_S", help="a per-GPU throughput input (repeatable)")
    parser.add_argument("--goal-placeholders", action="store_true",
                        help="where a model has no input, use the target throughput, labelled as a placeholder")
    parser.add_argument("--overlap", action="store_true", help="assume reduce-scatter overlaps backward")
    parser.add_argument("--gpus-per-node", type=int, default=Network.gpus_per_node)
    parser.add_argument("--nvlink-gb-s", type=float, default=Network.nvlink_gb_s,
                        help="per GPU and direction (default: H100 SXM NVLink 4, 900 GB/s both ways)")
    parser.add_argument("--infiniband-gb-s", type=float, default=Network.infiniband_gb_s,
                        help="per GPU (default: one 400 Gb/s NDR adapter per GPU, as in a DGX H100)")
    parser.add_argument("--hop-latency-us", type=float, default=Network.hop_latency_us)
    parser.add_argument("--grad-bytes", type=int, default=Traffic.grad_bytes)
    parser.add_argument("--param-bytes", type=int, default=Traffic.param_bytes)
    parser.add_argument("--bucket-elements", type=int, default=Traffic.bucket_elements,
                        help="DeepSpeed's reduce_bucket_size (default: DeepSpeed's 5e8)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak for an MFU goal placeholder (default: H100 SXM)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    inputs: dict[str, list[Throughput]] = {}
    try:
        for path in args.from_json:
            model, points = throughput_from_json(path)
            inputs.setdefault(model, []).extend(points)
    except (OSError, ValueError, KeyError) as error:
        print(f"time_to_train: {error}", file=sys.stderr)
        return 2
    for model, point in args.throughput:
        inputs.setdefault(model, []).append(point)
    known = {w.model for w in WORKLOADS}
    unknown = set(inputs) - known
    if unknown:
        print(f"time_to_train: no workload for {sorted(unknown)}; projected models: {sorted(known)}", file=sys.stderr)
        return 2

    from agvm_ds.detection import build_detector, load_spec
    from agvm_ds.detection.summary import forward_flops, parameter_counts

    network = Network(args.gpus_per_node, args.nvlink_gb_s, args.infiniband_gb_s, args.hop_latency_us)
    sections = []
    for workload in WORKLOADS:
        model = build_detector(load_spec(workload.model), device="meta")  # counts only: no memory
        if workload.model not in inputs and args.goal_placeholders:
            flops = forward_flops(model, workload.size)["total"]
            inputs[workload.model] = [goal_placeholder(workload, flops, args.peak_tflops * 1e12)]
        if workload.model not in inputs:
            sections.append(f"{workload.model}: no throughput input (give --from-json, --throughput or "
                            f"--goal-placeholders)\n{workload.paper}")
            continue
        parameters = parameter_counts(model, trainable_only=True)["total"]
        traffic = Traffic(parameters, args.grad_bytes, args.param_bytes, args.bucket_elements)
        rows = [(gpus, estimate_step(workload, gpus, inputs[workload.model], traffic, network, args.overlap))
                for gpus in GPU_COUNTS]
        sections.append(format_table(workload, parameters, inputs[workload.model], rows))
    print(format_assumptions(network, args.overlap, args.grad_bytes, args.param_bytes, args.bucket_elements))
    print("\n\n".join([""] + sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
