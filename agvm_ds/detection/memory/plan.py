"""The plan: model states plus measured activations per configuration, and whether it fits a GPU."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Optional, Sequence

from ..detectors import build_detector
from ..spec import ModelSpec
from .activations import ActivationProfile, measure_activations
from .model_states import (
    PHASES,
    GiB,
    ParamStats,
    StateLine,
    ZeroSetup,
    _bytes,
    deepspeed_estimate,
    model_states,
    param_stats,
)

__all__ = ["PlanRow", "fits", "format_plan", "gpu_peak", "plan", "plan_notes"]


@dataclass(frozen=True)
class PlanRow:
    """The memory of one rank for one configuration: model states and measured activations."""

    setup: ZeroSetup
    checkpointing: bool
    activations: ActivationProfile
    states: tuple[StateLine, ...]
    estimate: Optional[tuple[int, int]] = None

    def gpu(self, *names: str) -> int:
        """GPU bytes of the state lines called ``names``."""
        return sum(line.gpu for line in self.states if line.name in names)

    @property
    def gpu_peak(self) -> int:
        return gpu_peak(self.states, self.activations)

    @property
    def host(self) -> int:
        return sum(line.host for line in self.states)

    @property
    def nvme(self) -> int:
        return sum(line.nvme for line in self.states)


def gpu_peak(states: Sequence[StateLine], activations: ActivationProfile) -> int:
    """The most GPU bytes a rank holds during a step: the resident states, plus the larger of the
    forward/backward (activations; ZeRO-3's gathered parameters; ZeRO-0/1's gradients as they
    fill, from the measured timeline) and the optimizer step (its temporaries; whole gradients)."""
    by_phase = {phase: sum(line.gpu for line in states if line.phase == phase) for phase in PHASES}
    forward_backward = by_phase["forward/backward"] + (
        activations.peak_with_grads if by_phase["filled"] else activations.peak)
    return by_phase["resident"] + max(forward_backward, by_phase["step"] + by_phase["filled"])


def plan(spec: ModelSpec, setups: Sequence[ZeroSetup], images: Sequence[int], size: tuple[int, int],
         checkpointing: Sequence[bool], gpus_per_node: int = 8, stats: Optional[ParamStats] = None) -> list[PlanRow]:
    """One :class:`PlanRow` per setup x checkpointing x images, with activations measured once per
    distinct (checkpointing, images, precision, ZeRO-3 autocast) and DeepSpeed's estimate beside."""
    stats = stats or param_stats(build_detector(spec, device="meta"))
    measured: dict[tuple, ActivationProfile] = {}
    rest_cache: dict = {}
    rows = []
    for setup in setups:
        for ckpt in checkpointing:
            for count in images:
                gathered = setup.stage == 3 and setup.precision == "autocast-bf16"
                key = (ckpt, count, setup.precision, gathered)
                if key not in measured:
                    measured[key] = measure_activations(spec.with_overrides({"checkpointing": ckpt}), count, size,
                                                        setup.precision, gathered, rest_cache)
                rows.append(PlanRow(setup, ckpt, measured[key], tuple(model_states(stats, setup)),
                                    deepspeed_estimate(stats, setup, gpus_per_node)))
    return rows


def fits(row: PlanRow, gpu_gib: float, reserve_gib: float) -> str:
    """``yes`` when the plan plus ``reserve_gib`` (CUDA context, NCCL and cuBLAS buffers, allocator
    fragmentation) fits in ``gpu_gib``; ``tight`` when it does with less than 10% of the GPU to spare."""
    need = row.gpu_peak / GiB + reserve_gib
    if need > gpu_gib:
        return "no"
    return "tight" if need > 0.9 * gpu_gib else "yes"


_COLUMNS = (
    ("params", ("parameters", "persistent parameters")),
    ("grads", ("gradients",)),
    ("optim", ("optimizer states",)),
    ("master", ("fp32 master",)),
    ("buffers", ("module buffers", "gradient buckets", "gathered parameters")),
    ("step", ("step temporaries",)),
)


def format_plan(rows: Sequence[PlanRow], gpu_memory: Sequence[float], reserve_gib: float) -> str:
    """The plan as a table (GiB per rank), one row per configuration, and the notes that explain it."""
    header = (f"{'ZeRO':>4} {'ranks':>5} {'ckpt':>4} {'img':>3} "
              + "".join(f"{name:>8}" for name, _ in _COLUMNS)
              + f"{'act':>8}{'GPU peak':>10}{'host':>8}{'DS est.':>9}"
              + "".join(f"{f'{gib:g} GiB':>8}" for gib in gpu_memory))
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = "".join(f"{row.gpu(*names) / GiB:8.2f}" for _, names in _COLUMNS)
        estimate = f"{row.estimate[0] / GiB:9.2f}" if row.estimate else f"{'-':>9}"
        lines.append(
            f"{row.setup.stage:>4} {row.setup.world:>5} {'on' if row.checkpointing else 'off':>4} "
            f"{row.activations.images:>3} {cells}{row.activations.peak / GiB:8.2f}{row.gpu_peak / GiB:10.2f}"
            f"{row.host / GiB:8.2f}{estimate}" + "".join(f"{fits(row, gib, reserve_gib):>8}" for gib in gpu_memory))
    return "\n".join(lines + [""] + plan_notes(rows, reserve_gib))


def plan_notes(rows: Sequence[PlanRow], reserve_gib: float) -> list[str]:
    """What the columns mean and why DeepSpeed's estimate differs, for the setups in ``rows``."""
    notes = [
        "GiB per rank. params: the rank's parameters (ZeRO-3: its partition + the persistent small ones); grads, "
        "optim (fp32 moments), master (separate fp32 partition): ZeRO's arithmetic for DeepSpeed 0.19.8; buffers: "
        "module buffers + gradient buckets (reduce_bucket_size per communication dtype, x2 with overlap_comm) + "
        "ZeRO-3's gathered parameters (max_live_parameters + prefetch_bucket_size, an upper bound); step: "
        "optimizer-step temporaries; act: measured activation peak of forward + backward (no gradients).",
        "GPU peak = resident states + max(forward/backward, step), less than the sum of the columns: ZeRO-0/1 "
        "gradients fill as the activations are freed (measured), the step's temporaries come after them.",
        f"Fits: GPU peak + {reserve_gib:g} GiB reserve (CUDA context, NCCL/cuBLAS workspaces, fragmentation) <= "
        "GPU memory; 'tight': less than 10% of it left. host: offloaded states per rank (x ranks per node).",
    ]
    stages = {row.setup.stage for row in rows}
    for precision in dict.fromkeys(row.setup.precision for row in rows):
        if stages & {1, 2}:
            notes.append("DS est. (ZeRO-1/2: estimate_zero2_model_states_mem_needs, which has no ZeRO-1 variant): "
                         "2 B/param whole + 18 B/param partitioned (16-bit weights; 16-bit and fp32 gradients, fp32 "
                         f"master, two moments); ours with {precision}: {_zero12_formula(precision)}, and buckets.")
        if 3 in stages:
            notes.append("DS est. (ZeRO-3: estimate_zero3_model_states_mem_needs): 4 B x largest layer + 18 B/param "
                         f"partitioned; ours with {precision}: {_zero3_formula(precision)}, persistent parameters, "
                         "the gathered working set and one bucket per communication dtype.")
    return [line for note in notes for line in textwrap.wrap(note, 116, subsequent_indent="  ")]


def _zero12_formula(precision: str) -> str:
    if _bytes(precision) == 4:
        return "4 B/param whole (fp32 weights) + 16 B/param partitioned (fp32 gradients, master, moments)"
    return "2 B/param whole + 14 B/param partitioned (16-bit gradients, fp32 master, moments) + 4 in the step"


def _zero3_formula(precision: str) -> str:
    if _bytes(precision) == 4:
        return "16 B/param partitioned (fp32 weights stepped in place, no master copy; fp32 gradients; moments)"
    return "16 B/param partitioned (16-bit weights and gradients, fp32 master, moments)"
