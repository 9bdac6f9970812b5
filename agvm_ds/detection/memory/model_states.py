"""Model states per rank from ZeRO's arithmetic, as DeepSpeed 0.19.8 allocates them.

**Model states** (parameters, gradients, optimizer moments, fp32 master weights, DeepSpeed's buffers)
follow from the parameter count and DeepSpeed's code, so they are arithmetic. :func:`model_states`
writes down what DeepSpeed 0.19.8 allocates, read in its source (``runtime/zero/stage_1_and_2.py``,
``runtime/zero/stage3.py``, ``runtime/engine.py``), not the rule of thumb of the ZeRO paper:

- ZeRO-1/2 keep the model's parameters whole (``bit16_groups_flat``, in the model's dtype: fp32 under
  ``torch_autocast``) *and* a separate fp32 partition (``single_partition_of_fp32_groups``, a clone),
  even when the weights are fp32 already. ZeRO-1 leaves full gradients in ``param.grad``; ZeRO-2
  copies each reduced gradient into a partition-sized ``grads_in_partition``. Both allocate
  ``reduce_bucket_size`` gradient buckets in the model's dtype, one per communication dtype (two
  under autocast: bf16 for Linear/Conv parameters, fp32 for the rest), doubled by ``overlap_comm``.
- ZeRO-3 partitions the parameters; when they are fp32 (fp32, or autocast) the optimizer steps the
  partition itself: no second fp32 copy ("we don't need another copy of the weights",
  ``_create_fp32_partitions``). Small parameters (``param_persistence_threshold``) stay whole on
  every rank, gathered parameters live while their module runs (bounded by ``max_live_parameters``
  + ``prefetch_bucket_size``), gradients land in a partition-sized flat buffer, and there is one
  ``reduce_bucket_size`` bucket per communication dtype.
- Offload moves the optimizer's partition (master, moments, gradient partition) or ZeRO-3's parameter
  partition to host memory or NVMe; the plan shows GPU and host bytes apart.

DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``) are printed beside these.
They assume 16-bit parameters and count 18 bytes per parameter (16-bit and fp32 gradients, fp32
master, two fp32 moments) however the run is configured; :func:`deepspeed_estimate` returns their
numbers and the plan says where they differ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "GiB", "LOWER_PRECISION_SAFE_MODULES", "OFFLOAD_DEVICES", "OPTIMIZER_MOMENTS", "PHASES", "PRECISIONS",
    "ParamStats", "StateLine", "ZeroSetup", "deepspeed_estimate", "model_states", "param_stats"
]

GiB = 1 << 30

#: Run precisions: ``autocast-bf16`` is DeepSpeed's ``torch_autocast`` section (fp32 weights, bf16
#: matmuls), ``bf16``/``fp16`` its ``bf16``/``fp16`` sections (16-bit weights).
PRECISIONS = ("fp32", "autocast-bf16", "bf16", "fp16")
#: fp32 moments per parameter of the optimizers the trainer builds.
OPTIMIZER_MOMENTS = {"adamw": 2, "lamb": 2, "lars": 1, "sgd": 1}
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
#: The module classes DeepSpeed's ``torch_autocast`` marks for bf16 communication (its default
#: ``lower_precision_safe_modules``, matched by exact class).
LOWER_PRECISION_SAFE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)




@dataclass(frozen=True)
class ZeroSetup:
    """A DeepSpeed run as far as memory goes: ZeRO stage, data-parallel world, precision, optimizer,
    offload, and the ``zero_optimization`` knobs that size DeepSpeed's buffers (DeepSpeed's defaults).

    Args:
        overlap_comm: None is DeepSpeed's default: on for ZeRO-3 only.
        foreach: torch.optim's multi-tensor step, its default on GPUs; False is the per-tensor step
            it takes on CPU tensors (timm's LAMB always steps per tensor).
    """

    stage: int
    world: int = 1
    precision: str = "autocast-bf16"
    optimizer: str = "adamw"
    offload_optimizer: str = "none"
    offload_param: str = "none"
    reduce_bucket_size: int = 500_000_000
    overlap_comm: Optional[bool] = None
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    param_persistence_threshold: int = 100_000
    sub_group_size: int = 1_000_000_000
    foreach: bool = True

    def __post_init__(self) -> None:
        _check_choice("stage", self.stage, (0, 1, 2, 3))
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("optimizer", self.optimizer, tuple(OPTIMIZER_MOMENTS))
        _check_choice("offload_optimizer", self.offload_optimizer, OFFLOAD_DEVICES)
        _check_choice("offload_param", self.offload_param, OFFLOAD_DEVICES)
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world={self.world!r} is invalid: expected a number of ranks >= 1")
        for key in _SIZE_KNOBS:  # element counts; DeepSpeed configs often write them as 5e8
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != int(value):
                raise ValueError(f"{key}={value!r} is invalid: expected a number of elements >= 0")
            object.__setattr__(self, key, int(value))
        if self.offload_param != "none" and self.stage != 3:
            raise ValueError(f"offload_param={self.offload_param!r} needs ZeRO-3, not stage {self.stage}")
        if self.offload_optimizer != "none" and self.stage == 0:
            raise ValueError(f"offload_optimizer={self.offload_optimizer!r} needs ZeRO-1, 2 or 3, not stage 0")
        if self.offload_optimizer == "nvme" and self.stage != 3:
            raise ValueError(f"offload_optimizer='nvme' needs ZeRO-3 (ZeRO-Infinity), not stage {self.stage}")

    @property
    def overlap(self) -> bool:
        """Whether gradient buckets are doubled (``overlap_comm``, by default on for ZeRO-3 only)."""
        return self.stage == 3 if self.overlap_comm is None else self.overlap_comm

    @classmethod
    def from_ds_config(cls, config: dict[str, Any], world: int, optimizer: str = "adamw") -> "ZeroSetup":
        """The setup a DeepSpeed config (a parsed JSON) describes, on ``world`` ranks."""
        zero = config.get("zero_optimization", {})
        knobs = {
            "reduce_bucket_size": zero.get("reduce_bucket_size"),
            "overlap_comm": zero.get("overlap_comm"),
            "contiguous_gradients": zero.get("contiguous_gradients"),
            "prefetch_bucket_size": zero.get("stage3_prefetch_bucket_size", zero.get("prefetch_bucket_size")),
            "max_live_parameters": zero.get("stage3_max_live_parameters", zero.get("max_live_parameters")),
            "param_persistence_threshold": zero.get("stage3_param_persistence_threshold",
                                                    zero.get("param_persistence_threshold")),
            "sub_group_size": zero.get("sub_group_size"),
        }
        knobs = {k: v for k, v in knobs.items() if v is not None}
        return cls(stage=zero.get("stage", 0), world=world, precision=_ds_precision(config), optimizer=optimizer,
                   offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none"),
                   offload_param=zero.get("offload_param", {}).get("device", "none"), **knobs)


_SIZE_KNOBS = ("reduce_bucket_size", "prefetch_bucket_size", "max_live_parameters", "param_persistence_threshold",
               "sub_group_size")


def _ds_precision(config: dict[str, Any]) -> str:
    enabled = [name for name in ("bf16", "fp16") if config.get(name, {}).get("enabled")]
    autocast = config.get("torch_autocast", {})
    if autocast.get("enabled"):
        if enabled or autocast.get("dtype", "bfloat16") not in ("bfloat16", "torch.bfloat16", "bf16"):
            raise ValueError(f"torch_autocast={autocast!r} is not planned: only bf16 autocast with bf16/fp16 off")
        return "autocast-bf16"
    return enabled[0] if enabled else "fp32"


@dataclass(frozen=True)
class ParamStats:
    """What the model-state arithmetic needs to know of a model (see :func:`param_stats`).

    Args:
        trainable / frozen: parameter counts (frozen ones have no gradients or optimizer states).
        lower_precision: trainable parameters of the modules DeepSpeed's autocast reduces in bf16.
        sizes: element count of every parameter tensor (ZeRO-3 keeps the small ones whole).
        largest_param: the largest trainable parameter tensor (per-tensor optimizer temporaries).
        largest_layer: the most parameters one module holds itself (DeepSpeed's estimator's input).
        buffer_bytes: the module buffers (BatchNorm statistics, index tables), kept whole by ZeRO.
    """

    trainable: int
    frozen: int
    lower_precision: int
    sizes: tuple[int, ...]
    largest_param: int
    largest_layer: int
    buffer_bytes: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def param_stats(model: nn.Module) -> ParamStats:
    """The :class:`ParamStats` of ``model`` (any device, the meta device included)."""
    params = list(model.parameters())
    lower = sum(p.numel() for m in model.modules() if type(m) in LOWER_PRECISION_SAFE_MODULES
                for p in m.parameters(recurse=False) if p.requires_grad)
    trainable = [p.numel() for p in params if p.requires_grad]
    return ParamStats(
        trainable=sum(trainable),
        frozen=sum(p.numel() for p in params if not p.requires_grad),
        lower_precision=lower,
        sizes=tuple(p.numel() for p in params),
        largest_param=max(trainable, default=0),
        largest_layer=max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
    )


#: When a state line is alive: all step long, only in forward/backward, only in the optimizer step,
#: or (ZeRO-0/1 gradients) filled during backward, as the measured timeline has them, then whole.
PHASES = ("resident", "forward/backward", "step", "filled")


@dataclass(frozen=True)
class StateLine:
    """Bytes per rank of one kind of model state, by where they live, and when (:data:`PHASES`)."""

    name: str
    gpu: int = 0
    host: int = 0
    nvme: int = 0
    phase: str = "resident"


def model_states(stats: ParamStats, setup: ZeroSetup) -> list[StateLine]:
    """The model states of one rank under ``setup``, as DeepSpeed 0.19.8 allocates them.

    Partition sizes are ``ceil(n / world)``; DeepSpeed's alignment padding (a few elements) is left out.
    """
    states = {0: _stage0_states, 1: _stage12_states, 2: _stage12_states, 3: _stage3_states}[setup.stage]
    return [line for line in states(stats, setup) if line.gpu or line.host or line.nvme]


def _bytes(precision: str) -> int:
    """Bytes of a parameter (and of its gradient) in the model's dtype."""
    return torch.tensor([], dtype=_weight_dtype(precision)).element_size()


def _place(name: str, nbytes: int, device: str, phase: str = "resident") -> StateLine:
    """A line of ``nbytes`` on the GPU (``device`` none), in host memory (cpu) or on NVMe."""
    where = {"none": "gpu", "cpu": "host", "nvme": "nvme"}[device]
    return StateLine(name, phase=phase, **{where: nbytes})


def _optimizer_temporary(setup: ZeroSetup, stepped: int, largest: int) -> int:
    """fp32 bytes the optimizer allocates while it steps ``stepped`` elements held in tensors of at
    most ``largest`` elements. torch.optim's multi-tensor step (AdamW's ``sqrt(exp_avg_sq)``, SGD's
    ``grad + wd * param``) makes one temporary per tensor at once; the per-tensor step (torch.optim on
    CPU tensors, timm's LAMB) makes two of one tensor at a time."""
    if setup.foreach and setup.optimizer != "lamb":
        return 4 * stepped
    return 8 * min(largest, stepped)


def _stage0_states(stats: ParamStats, setup: ZeroSetup) -> list[StateLine]:
    """No ZeRO: the engine's client optimizer (fp32, autocast) or its fp16/bf16 optimizer (16-bit
    weights, a whole fp32 master copy); gradients whole; an all-reduce bucket flattened per step."""
    n, pb = stats.trainable, _bytes(setup.precision)
    master = n * 4 if pb == 2 else 0
    allreduce = min(n, 500_000_000) * pb if setup.world > 1 else 0  # engine.MEMORY_OPT_ALLREDUCE_SIZE
    step = _optimizer_temporary(setup, n, stats.largest_param) + master  # + the master's fp32 gradients
    return [
        StateLine("parameters", gpu=stats.total * pb),
        StateLine("module buffers", gpu=stats.buffer_bytes),
        StateLine("gradients", gpu=n * pb, phase="filled"),
        StateLine("optimizer states", gpu=OPTIMIZER_MOMENTS[setup.optimizer] * n * 4),
        StateLine("fp32 master", gpu=master),
        StateLine("step temporaries", gpu=max(allreduce, step), phase="step"),
    ]


def _stage12_states(stats: ParamStats, setup: ZeroSetup) -> list[StateLine]:
    """ZeRO-1/2 (``DeepSpeedZeroOptimizer``): whole parameters in the model's dtype plus a separate
    fp32 partition; ZeRO-1 keeps whole gradients, ZeRO-2 a gradient partition; IPG buckets."""
    n, pb, w = stats.trainable, _bytes(setup.precision), setup.world
    part = math.ceil(n / w)
    off = setup.offload_optimizer
    if setup.stage == 1:  # whole, in param.grad, until the step
        grads = [StateLine("gradients", gpu=n * pb, phase="filled")]
    else:  # the partition; with offload, one parameter's staging buffer (reduced into pinned fp32)
        grads = [StateLine("gradients", gpu=(part if off == "none" else stats.largest_param) * pb)]
    if off != "none":  # the fp32 partition's .grad and a staging buffer, in host memory
        grads.append(StateLine("gradients", host=part * 4 + stats.largest_param * pb))
    buckets = setup.reduce_bucket_size * (2 if setup.overlap else 1) * _comm_dtypes(stats, setup) * pb
    step = part * 4 + _optimizer_temporary(setup, part, part) if off == "none" else 0
    return [
        StateLine("parameters", gpu=stats.total * pb, host=part * pb if off != "none" else 0),
        StateLine("module buffers", gpu=stats.buffer_bytes),
        *grads,
        _place("optimizer states", OPTIMIZER_MOMENTS[setup.optimizer] * part * 4, off),
        _place("fp32 master", part * 4, off),
        StateLine("gradient buckets", gpu=buckets if setup.contiguous_gradients else 0),
        StateLine("step temporaries", gpu=step, phase="step"),
    ]


def _stage3_states(stats: ParamStats, setup: ZeroSetup) -> list[StateLine]:
    """ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): partitioned parameters (no second fp32 copy when
    they are fp32), persistent small parameters, gathered parameters, a gradient partition, one
    bucket per communication dtype."""
    n, pb, w = stats.trainable, _bytes(setup.precision), setup.world
    part, off = math.ceil(n / w), setup.offload_optimizer
    persistent = sum(s for s in stats.sizes if s <= setup.param_persistence_threshold)
    gathered = min(stats.total, setup.max_live_parameters + setup.prefetch_bucket_size)
    master = part * 4 if (pb != 4 or off != "none") else 0  # stage3.py: _create_fp32_partitions
    bucket_bytes = _comm_bytes(stats, setup)
    step = _optimizer_temporary(setup, min(part, setup.sub_group_size), part) if off == "none" else 0
    return [
        _place("parameters", math.ceil(stats.total / w) * pb, setup.offload_param),
        StateLine("persistent parameters", gpu=persistent * pb),
        StateLine("module buffers", gpu=stats.buffer_bytes),
        StateLine("gathered parameters", gpu=_gathered_bytes(stats, setup, gathered), phase="forward/backward"),
        _place("gradients", part * pb, off),
        _place("optimizer states", OPTIMIZER_MOMENTS[setup.optimizer] * part * 4, off),
        _place("fp32 master", master, off),
        StateLine("gradient buckets", gpu=setup.reduce_bucket_size * bucket_bytes * setup.contiguous_gradients),
        StateLine("step temporaries", gpu=step, phase="step"),
    ]


def _comm_dtypes(stats: ParamStats, setup: ZeroSetup) -> int:
    """Communication dtypes, one gradient bucket each: under autocast bf16 for the Linear/Conv
    parameters and fp32 for the rest (``get_all_comm_dtypes``), else one."""
    if setup.precision != "autocast-bf16":
        return 1
    return int(stats.lower_precision > 0) + int(stats.trainable > stats.lower_precision)


def _gathered_bytes(stats: ParamStats, setup: ZeroSetup, elements: int) -> int:
    """Bytes of ``elements`` gathered ZeRO-3 parameters: under autocast the Linear/Conv ones are
    gathered in bf16, the rest in fp32; else in the model's dtype."""
    if setup.precision != "autocast-bf16" or not stats.trainable:
        return elements * _bytes(setup.precision)
    share = stats.lower_precision / stats.trainable
    return int(elements * (2 * share + 4 * (1 - share)))


def _comm_bytes(stats: ParamStats, setup: ZeroSetup) -> int:
    """Bytes per element summed over ZeRO-3's buckets (each in its own communication dtype)."""
    if setup.precision != "autocast-bf16":
        return _bytes(setup.precision)
    return 2 * int(stats.lower_precision > 0) + 4 * int(stats.trainable > stats.lower_precision)


def deepspeed_estimate(stats: ParamStats, setup: ZeroSetup, gpus_per_node: int = 8) -> Optional[tuple[int, int]]:
    """(GPU bytes per rank, host bytes per node) by DeepSpeed's own estimator for ``setup``'s stage.

    These are the numbers ``estimate_zero2_model_states_mem_needs_all_cold`` /
    ``estimate_zero3_..._all_cold`` print: 2 bytes per parameter whole plus 18 per partitioned one
    (16-bit and fp32 gradients, fp32 master, two moments), 4 x ``largest_layer`` for ZeRO-3, and
    offload as they model it. None for ZeRO-0, which DeepSpeed does not estimate.
    """
    if setup.stage == 0:
        return None
    per_node = min(setup.world, gpus_per_node)
    nodes = math.ceil(setup.world / per_node)
    offload = setup.offload_optimizer != "none"
    if setup.stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, gpu, _ = estimate_zero3_model_states_mem_needs(
            stats.total, stats.largest_layer, per_node, nodes, cpu_offload=offload,
            cpu_offload_params=setup.offload_param != "none")
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        host, gpu = estimate_zero2_model_states_mem_needs(stats.total, per_node, nodes, cpu_offload=offload)
    return gpu, host


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is invalid: expected one of {list(choices)}")


def _weight_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
