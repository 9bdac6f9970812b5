"""Step time with AGVM / without AGVM, per ZeRO stage, and the bytes AGVM adds per statistics step.

Run under the DeepSpeed launcher (CPU ranks with gloo where there is no GPU):

    deepspeed --num_gpus 2 benchmarks/agvm_overhead.py [--steps 40] [--width 1024]

For each stage it builds two engines on the same model: one whose client optimizer is AGVM(SGD),
one plain SGD. It alternates their steps on the same batches (so drift in machine load hits both
alike) and prints the mean of the paired per-step time ratios, with a 95% confidence interval, with
statistics on every step (interval=1, the worst case) and at the paper's interval of 10. Bytes come from
DeepSpeed's comms logger, which records every collective issued through deepspeed.comm under AGVM's log name.
"""
from __future__ import annotations

import argparse
import copy

import deepspeed
import deepspeed.comm as dist
import torch
from timing import interleaved_times, paired_ratio
from torch import nn

from agvm_ds import AGVM, AGVMConfig, initialize, module_param_groups

MODULES = {"backbone": ["backbone"], "fpn": ["fpn"], "rpn": ["rpn"], "roi_head": ["roi_head"]}


def mlp(width: int, depth: int) -> nn.Sequential:
    return nn.Sequential(*[layer for _ in range(depth) for layer in (nn.Linear(width, width), nn.GELU())])


class FourModuleNet(nn.Module):
    """Stands in for a detector's four AGVM modules, with many parameter tensors per module."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.backbone, self.fpn, self.rpn, self.roi_head = mlp(width, 6), mlp(width, 3), mlp(width, 2), mlp(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.fpn(self.backbone(x))
        return self.rpn(features).square().mean() + self.roi_head(features).square().mean()


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,  # torch's SGD is not on DeepSpeed's ZeRO list either
        "comms_logger": {"enabled": True, "prof_all": False, "prof_ops": ["agvm_stats"]},
    }


def train_step(engine, batches: list[torch.Tensor]) -> None:
    for x in batches:
        engine.backward(engine(x))
        engine.step()


def bench_stage(stage: int, interval: int, width: int, steps: int) -> tuple[float, float, int, int, int]:
    torch.manual_seed(0)
    model = FourModuleNet(width)
    baseline_model = copy.deepcopy(model)
    grad_bytes = sum(p.numel() * 4 for p in model.parameters())  # before ZeRO-3 partitions them
    base = torch.optim.SGD(module_param_groups(model, MODULES), lr=1e-3, momentum=0.9)
    agvm = AGVM(base, AGVMConfig(interval=interval))
    with_agvm, _, _, _ = initialize(model=model, optimizer=agvm, config=ds_config(stage))
    baseline, _, _, _ = deepspeed.initialize(
        model=baseline_model,
        optimizer=torch.optim.SGD(module_param_groups(baseline_model, MODULES), lr=1e-3, momentum=0.9),
        config=ds_config(stage),
    )
    dist.comms_logger.reset_data()
    times = interleaved_times(
        {"agvm": lambda batches: train_step(with_agvm, batches), "base": lambda batches: train_step(baseline, batches)},
        inputs=lambda _: [torch.randn(16, width) for _ in range(2)],
        rounds=steps, warmup=5, sync=dist.barrier,
    )
    logged = dist.comms_logger.comms_dict.get("agvm_stats", {})
    calls = sum(record[0] for record in logged.values())
    bytes_per_call = max(logged) if logged else 0
    # paired ratios: each AGVM step against the baseline step run right next to it
    ratio = paired_ratio(times["agvm"], times["base"])
    return ratio.mean, ratio.half_width, bytes_per_call, calls, grad_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--local_rank", type=int, default=0)  # set by the deepspeed launcher
    args = parser.parse_args()
    deepspeed.init_distributed()
    torch.set_num_threads(1)
    rows = []
    for stage in (0, 1, 2, 3):
        for interval in (1, 10):
            rows.append((stage, interval, *bench_stage(stage, interval, args.width, args.steps)))
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        print(f"\nAGVM overhead, {world} ranks, {args.steps} timed steps per engine, GAS 2, width {args.width}")
        print("stage  interval  step time AGVM/base (95% CI)  AGVM bytes/stats step  stats steps  "
              "official ~bytes/stats step")
        for stage, interval, ratio, half_width, nbytes, calls, grad_bytes in rows:
            # official AGVM: one extra full-gradient all-reduce within halves + a full gradient exchange
            print(f"{stage:>5}  {interval:>8}  {ratio:>12.3f} +- {half_width:.3f}  {nbytes:>21}  {calls:>11}  "
                  f"{2 * grad_bytes:>26}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
