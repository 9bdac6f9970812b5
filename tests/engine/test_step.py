"""StepRunner.run_step: host synchronisations per optimizer step, and exact non-finite-loss skipping.

On CPU there is no device queue to stall, so the host reads are counted by patching every tensor-to-
host conversion (``item``, ``tolist``, ``bool``/``float``/``int``, ``numpy``, ``cpu``); the engine is
a real DeepSpeed engine with AGVM on one spawned CPU rank.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import pytest
import torch
from distributed import run_ranks
from torch import nn

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


class TinyDetector(nn.Module):
    """A conv with BatchNorm and a linear head; two named losses, like a detector's loss dict."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        out = self.head(self.body(torch.stack(images)).mean((2, 3)))
        y = torch.stack([t["y"] for t in targets])
        return {"loss_a": (out[:, 0] - y).square().mean(), "loss_b": out[:, 1].abs().mean()}


def micro_batches(count: int, nan_at: tuple[int, ...] = ()) -> list:
    """``count`` micro-batches of random images, with NaN ones inserted at the positions ``nan_at``."""
    from agvm_ds.engine.step import MicroBatch

    generator = torch.Generator().manual_seed(0)
    batches = [MicroBatch([torch.rand(3, 6, 6, generator=generator) for _ in range(2)],
                          [{"y": torch.rand((), generator=generator)} for _ in range(2)]) for _ in range(count)]
    for index in sorted(nan_at):
        batches.insert(index, MicroBatch([torch.full((3, 6, 6), float("nan"))] * 2, batches[0].targets))
    return batches


def runner(zero_stage: int, skip: Optional[int], agvm: bool = True, accumulation: int = 2, adam: bool = True):
    from agvm_ds.agvm import AGVM, AGVMConfig, module_param_groups
    from agvm_ds.engine.builders import build_step_runner

    torch.manual_seed(0)
    model = TinyDetector()
    groups = module_param_groups(model, {"backbone": ["body"], "head": ["head"]}, weight_decay=1e-4, lr=0.05)
    base = torch.optim.AdamW(groups, lr=0.05) if adam else torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    optimizer = AGVM(base, AGVMConfig(enabled=agvm, interval=1, start_iter=0))
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accumulation,
                 "zero_optimization": {"stage": zero_stage}, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    return build_step_runner(model, optimizer, ds_config, lambda step: 1.0, skip, report=lambda message: None)


@contextmanager
def counting_host_reads() -> Iterator[list[str]]:
    reads: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield reads
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


def host_reads_per_step(rank: int, world: int, skip: Optional[int]) -> list[tuple[bool, int]]:
    """(logged, host reads) of each of six steps, every third one logged. AGVM off and SGD: AGVM's
    statistics steps and AdamW read their own (CPU-resident) scalars, which are no device reads."""
    steps = runner(0, skip, agvm=False, adam=False)
    data = iter(micro_batches(16))
    steps.run_step(data)  # creates the optimizer state
    result = []
    for index in range(6):
        log = index % 3 == 2
        with counting_host_reads() as reads:
            outcome = steps.run_step(data, log=log)
        assert outcome.stepped and (outcome.losses is not None) == log
        result.append((log, len(reads)))
    return result


@pytest.mark.parametrize("skip", [20, None], ids=["skipping", "no-skipping"])
def test_at_most_one_host_read_per_step_and_none_unlogged_without_skipping(tmp_path, skip):
    (reads,) = run_ranks(host_reads_per_step, 1, skip)
    for logged, count in reads:
        assert count <= 1, reads
        if skip is None and not logged:
            assert count == 0, reads  # nothing to check: a step without logging never waits for the device
        if skip is not None:
            assert count == 1, reads  # the window's finiteness, read before the boundary backward


def trained(rank: int, world: int, zero_stage: int, nan_at: tuple[int, ...]) -> dict:
    """Three optimizer steps over micro-batches with NaN images at ``nan_at``."""
    from agvm_ds.engine.buffers import running_stats

    steps = runner(zero_stage, skip=20)
    data = iter(micro_batches(6, nan_at))
    logged = [steps.run_step(data, log=True).losses for _ in range(3)]
    module = steps.engine.module
    return {
        "params": [p.detach().clone() for p in module.parameters()],
        "buffers": [b.clone() for b in running_stats(module)],
        "agvm": steps.engine.basic_optimizer.statistics(),
        "logged": logged,
        "skipped": steps.skipped_nonfinite,
        "iterations": steps.engine.global_steps,
        "left": len(list(data)),
    }


@pytest.mark.parametrize("zero_stage", [0, 2])
@pytest.mark.parametrize("nan_at", [(0,), (1,), (2, 3), (1, 2, 5)], ids=["unchecked", "boundary", "both", "three"])
def test_a_skipped_micro_batch_leaves_no_trace(tmp_path, zero_stage, nan_at):
    """The run with NaN micro-batches ends bitwise where the run without them does: weights, BatchNorm
    statistics, AGVM's measurements, the logged losses; the window waits for enough finite ones."""
    clean, poisoned = (run_ranks(trained, 1, zero_stage, nan)[0] for nan in ((), nan_at))
    assert poisoned["skipped"] == len(nan_at) and poisoned["iterations"] == clean["iterations"] == 3
    assert poisoned["left"] == clean["left"] == 0
    for a, b in zip(clean["params"] + clean["buffers"], poisoned["params"] + poisoned["buffers"]):
        assert torch.equal(a, b)
    assert clean["agvm"] == poisoned["agvm"] and clean["logged"] == poisoned["logged"]
    assert all(v["phi"] > 0 for v in clean["agvm"].values())  # measured: two micro-batches per step


def diverging(rank: int, world: int, accumulation: int) -> str:
    from agvm_ds.engine.step import TrainingDiverged

    steps = runner(0, skip=3, accumulation=accumulation)
    data = iter(micro_batches(accumulation, nan_at=tuple(range(accumulation, accumulation + 10))))
    try:
        while steps.run_step(data).stepped:
            pass
    except TrainingDiverged as error:
        return f"{steps.engine.global_steps}|{steps.skipped_nonfinite}|{error}"
    return "not stopped"


@pytest.mark.parametrize("accumulation", [1, 2])
def test_consecutive_skips_stop_a_diverged_run(tmp_path, accumulation):
    (result,) = run_ranks(diverging, 1, accumulation)
    iteration, skipped, message = result.split("|", 2)
    assert (int(iteration), int(skipped)) == (1, 3), message
    assert message.startswith("training diverged: 3 consecutive micro-batches had a non-finite loss")
