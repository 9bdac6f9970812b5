"""How much memory one GPU (rank) needs to train a detector: a plan from ZeRO's arithmetic and a
measured forward/backward (``agvm-model-info MODEL --plan``).

A rank holds two kinds of memory, and they are planned differently.

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

**Activations** depend on every op of the model, so they are measured, not modelled. A per-block
formula scaled from a small model would have to guess what autograd saves, what autocast casts and
keeps, and what checkpointing recomputes; instead the training forward and backward are *run* with
tensors that hold no data and a dispatch mode that adds up the bytes of every tensor storage while it
is alive (:class:`LiveBytes`: storages are noted when an op first returns them and dropped when their
last reference dies, so autograd's saved tensors, checkpointing's recomputation and the gradients
are all counted when and as long as they exist). Three things bring this close to a GPU run:

- **The dense trunk** (backbone body, FPN, RPN/RetinaNet head: nearly all activation memory) runs
  under ``FakeTensorMode`` on CPU-typed fake tensors: the 1B model at 1024x1024 costs no memory.
  Fake kernels give the shapes and dtypes the real kernels give; no real fallback kernel may run.
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
made). ``tests/detection/test_memory_plan.py`` runs the same code on a small SwinV2 Faster R-CNN and on
``faster_rcnn_r18_tiny`` and compares the planned peak with the CPU allocator's peak over a real
training step. Not counted: cuDNN/cuBLAS workspaces, the CUDA context, NCCL buffers, the caching
allocator's rounding and fragmentation, NVMe swap buffers in host memory; the plan's ``--reserve``
stands for the GPU ones.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import textwrap
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList

from .detectors import build_detector
from .spec import ModelSpec

__all__ = [
    "ActivationProfile", "LiveBytes", "OPTIMIZER_MOMENTS", "PRECISIONS", "ParamStats", "StateLine",
    "ZeroSetup", "cuda_autocast_policy", "deepspeed_estimate", "measure_activations", "model_states",
    "param_stats",
]

GiB = 1 << 30

#: Run precisions: ``autocast-bf16`` is DeepSpeed's ``torch_autocast`` section (fp32 weights, bf16
#: matmuls), ``bf16``/``fp16`` its ``bf16``/``fp16`` sections (16-bit weights).
PRECISIONS = ("fp32", "autocast-bf16", "bf16", "fp16")
#: fp32 moments per parameter of the optimizers the trainer builds.
OPTIMIZER_MOMENTS = {"adamw": 2, "lamb": 2, "sgd": 1}
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
#: The module classes DeepSpeed's ``torch_autocast`` marks for bf16 communication (its default
#: ``lower_precision_safe_modules``, matched by exact class).
LOWER_PRECISION_SAFE_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ----------------------------------------------------------------------------------------------
# Model states, from DeepSpeed's arithmetic


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


# ----------------------------------------------------------------------------------------------
# Live tensor bytes


class LiveBytes(TorchDispatchMode):
    """A dispatch mode that records, op by op, the bytes of the tensor storages alive.

    A storage is counted from the op that first returns it until its last reference dies (a weak
    reference's callback), so a view or an in-place op adds nothing. Storages an op *receives* that
    were made before the mode started (parameters, inputs) are known but not counted. The record is
    a list of ``(storage key, signed bytes)`` events; :meth:`peak` replays it, optionally without
    some storages (the parameters' gradients) and within marked phases.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self._live: dict[int, list] = {}  # id(storage) -> [serial, counted bytes, weak reference]
        self._serials = itertools.count()
        self._marks: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor in _tensor_leaves((args, kwargs)):
            self._note(tensor, counted=False)
        out = func(*args, **kwargs)
        for tensor in _tensor_leaves(out):
            self._note(tensor, counted=True)
        return out

    def _note(self, tensor: torch.Tensor, counted: bool) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return
        nbytes, entry = storage.nbytes(), self._live.get(id(storage))
        if entry is not None:
            if entry[1] and nbytes != entry[1]:  # resized in place (out= ops)
                self.events.append((entry[0], nbytes - entry[1]))
                entry[1] = nbytes
            return
        serial = next(self._serials)  # ids are reused once a storage dies; serials are not
        counted_bytes = nbytes if counted else 0
        if counted_bytes:
            self.events.append((serial, counted_bytes))
        forget = functools.partial(self._forget, id(storage))
        self._live[id(storage)] = [serial, counted_bytes, weakref.ref(storage, forget)]

    def _forget(self, key: int, _: weakref.ref) -> None:
        serial, nbytes, _ = self._live.pop(key)
        if nbytes:
            self.events.append((serial, -nbytes))

    def keys(self, tensors: Sequence[Optional[torch.Tensor]]) -> frozenset:
        """The record's keys of the (live) storages of ``tensors``, e.g. of the parameters' ``.grad``."""
        entries = (self._live.get(id(t.untyped_storage())) for t in tensors if t is not None)
        return frozenset(entry[0] for entry in entries if entry is not None)

    def mark(self, name: str) -> None:
        """Names the current point of the record (a phase boundary)."""
        self._marks[name] = len(self.events)

    def live(self, at: Optional[str] = None, exclude: frozenset = frozenset()) -> int:
        """Bytes alive at mark ``at`` (the end when None), without storages in ``exclude``."""
        end = len(self.events) if at is None else self._marks[at]
        return sum(delta for key, delta in self.events[:end] if key not in exclude)

    def peak(self, start: Optional[str] = None, end: Optional[str] = None,
             exclude: frozenset = frozenset()) -> int:
        """The most bytes alive at once between marks ``start`` and ``end``, without ``exclude``."""
        first = 0 if start is None else self._marks[start]
        last = len(self.events) if end is None else self._marks[end]
        live = self.live(start, exclude) if start is not None else 0
        best = live
        for key, delta in self.events[first:last]:
            if key not in exclude:
                live += delta
                best = max(best, live)
        return best


def _tensor_leaves(tree: Any) -> Iterator[torch.Tensor]:
    return (leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


# ----------------------------------------------------------------------------------------------
# CUDA's autocast policy, on CPU tensors

# ATen/autocast_mode.h of torch 2.x: the op lists CUDA's autocast kernels are built from.
_LOWER = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr",
    "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul",
    "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
)
_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
    "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
    "linalg_matrix_sqrth",  # registered apart from the header's lists; taken as fp32, as CPU autocast has it
)
_FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
_FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
            "tensordot", "scatter_add")
#: CUDA's policies by op; ops with a CPU autocast kernel that are in none of these lists pass through.
CUDA_AUTOCAST_POLICY: dict[str, str] = {
    **{op: "lower" for op in _LOWER}, **{op: "fp32" for op in _FP32},
    **{op: "fp32_set_opt_dtype" for op in _FP32_SET_OPT_DTYPE},
    **{op: "fp32_append_dtype" for op in _FP32_APPEND_DTYPE},
    **{op: "promote" for op in _PROMOTE},
}
_NO_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _aten_op(name: str) -> Any:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and value.device.type == "cpu")


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if _eligible(value) and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _with_dtype(op: Any, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """``args``/``kwargs`` of ``op`` with its optional ``dtype`` argument set to ``dtype`` if unset."""
    for index, argument in enumerate(op._schema.arguments):
        if argument.name != "dtype":
            continue
        if argument.kwarg_only or index >= len(args):
            if kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": dtype}
        elif args[index] is None:
            args = args[:index] + (dtype,) + args[index + 1:]
    return args, kwargs


def _policy_kernel(name: str, policy: str) -> Callable[..., Any]:
    """A CPU autocast kernel for aten op ``name`` that applies CUDA's ``policy`` (autocast_mode.h)."""
    op = _aten_op(name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST_CPU):
            first = next(_tensor_leaves(args), None)
            if policy == "lower":
                dtype = torch.get_autocast_dtype("cpu")
                return op(*_cast(args, dtype), **_cast(kwargs, dtype))
            if policy == "fp32":
                return op(*_cast(args, torch.float32), **_cast(kwargs, torch.float32))
            if policy == "promote":
                dtype = torch.get_autocast_dtype("cpu")
                for tensor in filter(_eligible, _tensor_leaves((args, kwargs))):
                    dtype = torch.promote_types(dtype, tensor.dtype)
                return op(*_cast(args, dtype), **_cast(kwargs, dtype))
            if not _eligible(first):
                return op(*args, **kwargs)
            if policy == "fp32_set_opt_dtype":
                args, kwargs = _with_dtype(op, args, kwargs, torch.float32)
                return op(*args, **kwargs)
            return _aten_op(_FP32_APPEND_DTYPE[name])(*args, **kwargs, dtype=torch.float32)

    return kernel


def _cpu_lower_precision_ops() -> set[str]:
    """aten ops whose CPU autocast kernel is already CUDA's: lower precision with the weight-cast cache."""
    return {op for op in _LOWER if op in _autocast_ops("AutocastCPU")}


def _autocast_ops(key: str) -> set[str]:
    """aten ops (``name`` or ``name.overload``) with a kernel for dispatch key ``key``."""
    ops = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
            ops.add(qualified[len("aten::"):])
    return ops


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """Within the block, ``torch.autocast("cpu")`` applies CUDA's autocast op lists instead of CPU's.

    Why: a measurement of what a GPU run keeps runs on (fake) CPU tensors, and the two policies
    differ where memory is made: CUDA autocast computes ``layer_norm``, ``softmax``, norms, sums and
    upsampling in fp32 (so a Swin's residual stream is fp32), CPU autocast keeps bf16 there. The ops
    that both run in bf16 keep CPU's C++ kernel, which caches the bf16 copy of each weight as CUDA's
    does; every other CPU autocast kernel is replaced (a pass-through where CUDA has none) and the
    replacement is removed on exit.
    """
    library = torch.library.Library("aten", "IMPL")
    keep = _cpu_lower_precision_ops()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
            for name, policy in CUDA_AUTOCAST_POLICY.items():
                if name not in keep and _has_op(name):
                    library.impl(name, _policy_kernel(name, policy), "AutocastCPU")
            for name in _autocast_ops("AutocastCPU") - set(CUDA_AUTOCAST_POLICY):
                library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        yield
    finally:
        library._destroy()


def _has_op(name: str) -> bool:
    try:
        _aten_op(name)
    except (AttributeError, RuntimeError):
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Activations, measured

#: Ground-truth boxes per synthetic image: the rest of the detector (matching, sampling, RoI heads)
#: is sized by its sampling knobs, not by this number, as long as enough proposals overlap them.
BOXES_PER_IMAGE = 8


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
    """
    _check_choice("precision", precision, PRECISIONS)
    height, width = (math.ceil(s / 32) * 32 for s in size)
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
    model = build_detector(spec, device="meta")  # timm's constructors read values: not under FakeTensorMode
    with _autocast_policy(precision), FakeTensorMode(allow_fallback_kernels=False):
        _make_fake(model, precision, gathered_bf16)
        tracker = LiveBytes()
        with tracker:
            batch = torch.empty(images, 3, height, width, dtype=_weight_dtype(precision))  # the transform's output
            with _autocast(precision):
                features = model.backbone(batch)
                head = _dense_head(model, list(features.values()))
            del batch
            tracker.mark("forward")
            consumed = [features[name] for name in _pooled_levels(model)] + list(_tensor_leaves(head))
            _GradientSink.apply(*consumed).backward()
        grads = [p.grad for p in model.parameters()]
        shapes = {"features": _shapes(features), "head": _shapes(head)}
        return _Record(tracker, tracker.keys(grads), _nbytes(grads)), shapes


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
        targets = _synthetic_targets(images, height, width, spec.num_classes, isinstance(model, MaskRCNN))
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


def _weight_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    """DeepSpeed's ``torch_autocast`` around the forward (on CPU tensors, see :func:`cuda_autocast_policy`),
    with the weight-cast cache off as the trainer runs it."""
    if precision != "autocast-bf16":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)


def _autocast_policy(precision: str) -> contextlib.AbstractContextManager:
    return cuda_autocast_policy() if precision == "autocast-bf16" else contextlib.nullcontext()


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} is invalid: expected one of {list(choices)}")


# ----------------------------------------------------------------------------------------------
# The plan


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
