"""Everything AGVM needs to know about a DeepSpeed engine, in one place.

The AGVM optimizer is a plain ``torch.optim.Optimizer`` that DeepSpeed wraps. What differs between
ZeRO stages and precisions -- how many times the inner ``step()`` runs per optimizer step, whether
its gradients are partitioned, by what the gradients were scaled and clipped -- is answered here
and nowhere else. These are DeepSpeed internals; they were read in the source of the version pinned
below and are checked against brute force by ``tests/agvm/test_agvm_deepspeed.py`` for every stage, so an
upgrade that changes them fails loudly there and here.

How the wrapper sees gradients, per engine kind (``EngineKind``):

================  =============================  =================  ==========================
kind              engine.optimizer               inner calls/step   inner ``p.grad``
================  =============================  =================  ==========================
CLIENT            the AGVM optimizer (Z0 fp32)   1                  full, replicated
FP16_UNFUSED      FP16_UnfusedOptimizer (Z0 bf16) 1                 full fp32 masters, replicated
BF16              BF16_Optimizer                 1                  flat partition per group
ZERO_1_2          DeepSpeedZeroOptimizer         1 per group        flat partition of the group
ZERO_3            DeepSpeedZeroOptimizer_Stage3  1 per sub-group    flat partition of the sub-group
================  =============================  =================  ==========================

Inner gradients are averaged, unscaled and clipped: g_inner = G * hook_scale / (c * loss_scale_now)
where c = max(1, (norm + 1e-6) / clip) is DeepSpeed's clip coefficient. Tensor hooks on the
parameters see the local micro-batch gradient times hook_scale / gradient_accumulation_steps.
"""
from __future__ import annotations

import enum
import json
import os
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from ..optim.layerwise import Fragment, LayerwiseOptimizer
from .optimizer import AGVM

__all__ = [
    "EngineKind", "DeepSpeedView", "SUPPORTED_DEEPSPEED", "initialize", "save_checkpoint",
    "load_checkpoint",
]

SUPPORTED_DEEPSPEED = ("0.19.",)
"""DeepSpeed release series whose internals this adapter was checked against."""


class EngineKind(enum.Enum):
    CLIENT = "client"
    FP16_UNFUSED = "fp16_unfused"
    BF16 = "bf16"
    ZERO_1_2 = "zero_1_2"
    ZERO_3 = "zero_3"


def _check_version() -> None:
    import deepspeed

    if not deepspeed.__version__.startswith(SUPPORTED_DEEPSPEED):
        raise RuntimeError(
            f"agvm_ds was checked against DeepSpeed {SUPPORTED_DEEPSPEED} internals, found "
            f"{deepspeed.__version__}; run tests/agvm/test_agvm_deepspeed.py before widening SUPPORTED_DEEPSPEED"
        )


class DeepSpeedView:
    """The facts about one engine that the AGVM optimizer relies on."""

    def __init__(self, engine, client_optimizer: torch.optim.Optimizer) -> None:
        _check_version()
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self.engine = engine
        inner = engine.optimizer
        if inner is client_optimizer:
            self.kind = EngineKind.CLIENT
        elif isinstance(inner, FP16_UnfusedOptimizer):
            if engine.fp16_enabled():
                # engine.backward scales the loss only for ZeRO optimizers, yet this optimizer divides
                # by its loss scale: every gradient would be off by the scale (DeepSpeed 0.19.8).
                raise ValueError(
                    "AGVM: fp16 with ZeRO stage 0 is not supported: DeepSpeed's FP16_UnfusedOptimizer "
                    "mis-scales gradients of a client optimizer. Use bf16, or fp16 with ZeRO stage >= 1."
                )
            self.kind = EngineKind.FP16_UNFUSED
        elif isinstance(inner, BF16_Optimizer):
            self.kind = EngineKind.BF16
        elif isinstance(inner, DeepSpeedZeroOptimizer_Stage3):
            self.kind = EngineKind.ZERO_3
        elif isinstance(inner, DeepSpeedZeroOptimizer):
            self.kind = EngineKind.ZERO_1_2
        else:
            raise ValueError(f"AGVM: unsupported DeepSpeed optimizer {type(inner).__name__}")
        if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None or getattr(
            inner, "torch_autocast_gradscaler", None
        ):
            # bf16 autocast needs no scaler and is supported; fp16 autocast scales through torch's
            # GradScaler, whose scale AGVM would have to undo in the hooks.
            raise ValueError(
                "AGVM: DeepSpeed torch_autocast with fp16 (GradScaler) is not supported; use "
                '"torch_autocast": {"dtype": "bfloat16"}, or the fp16 section with ZeRO stage >= 1'
            )

        import deepspeed.comm as dist

        self.dp_group = engine.seq_data_parallel_group
        self.dp_world_size = int(engine.dp_world_size)
        self.dp_rank = dist.get_rank(group=self.dp_group)
        self.device = torch.device(engine.device)
        self.grad_accumulation_steps = int(engine.gradient_accumulation_steps())
        self.clip = float(engine.gradient_clipping() or 0.0)
        self.grads_partitioned = self.kind in (EngineKind.BF16, EngineKind.ZERO_1_2, EngineKind.ZERO_3)
        if self.kind is EngineKind.ZERO_1_2:
            self.inner_calls_per_step = len(inner.bit16_groups)
        elif self.kind is EngineKind.ZERO_3:
            self.inner_calls_per_step = len(inner.fp16_groups)
        else:
            self.inner_calls_per_step = 1
        self.client_optimizer = client_optimizer
        self._masters = {}
        if self.kind is EngineKind.ZERO_1_2:
            self._flat_fp32_partitions = inner.single_partition_of_fp32_groups
        elif self.kind is EngineKind.BF16:
            self._flat_fp32_partitions = inner.fp32_groups_flat_partition
        if self.kind is EngineKind.FP16_UNFUSED:
            for lp_group, hp_group in zip(inner.fp16_groups, inner.fp32_groups):
                self._masters.update({id(lp): hp for lp, hp in zip(lp_group, hp_group)})
        # ZeRO-Infinity keeps the optimizer state on NVMe between steps: no exp_avg_sq to read in backward
        self.optimizer_state_on_nvme = bool(getattr(inner, "swap_optimizer", False))
        self._client_grad_norm: Optional[float] = None
        if self.kind is EngineKind.CLIENT and self.clip > 0:
            self._record_client_clip_norm()

    # --- step bookkeeping -------------------------------------------------------------------

    def window(self) -> int:
        """Identifies the accumulation window a backward pass belongs to (steps started so far).

        ``global_steps`` advances on every boundary, also when fp16 overflow skips the update, so a
        window whose step was skipped is never mixed into the next one.
        """
        return int(self.engine.global_steps)

    @property
    def num_micro_batches(self) -> int:
        """M: micro-batch gradients averaged into one optimizer step."""
        return self.dp_world_size * self.grad_accumulation_steps

    # --- gradient scales --------------------------------------------------------------------

    def loss_scale(self) -> float:
        """The loss scale engine.backward multiplies the loss by right now (1 without fp16)."""
        inner = self.engine.optimizer
        if self.kind in (EngineKind.ZERO_1_2, EngineKind.ZERO_3, EngineKind.FP16_UNFUSED):
            return float(inner.loss_scale)
        return 1.0

    def hook_grad_multiplier(self, window_loss_scale: float) -> float:
        """Turns a gradient seen by a tensor hook into the local micro-batch gradient."""
        backward_scale = window_loss_scale if self.kind in (EngineKind.ZERO_1_2, EngineKind.ZERO_3) else 1.0
        return self.grad_accumulation_steps / backward_scale

    def inner_grad_multiplier(self, window_loss_scale: float) -> float:
        """Turns a gradient seen by the inner step into the averaged, unclipped gradient G.

        Call only inside the inner step, where DeepSpeed has set the global norm of this step.
        """
        inner = self.engine.optimizer
        scale_now = self.loss_scale()
        if self.kind is EngineKind.CLIENT:
            norm = self._client_grad_norm
        elif self.kind is EngineKind.ZERO_1_2:
            # _global_grad_norm was divided by the scale before the update, the clip uses the one after.
            norm = float(inner._global_grad_norm) * window_loss_scale / scale_now
        elif self.kind is EngineKind.FP16_UNFUSED:
            norm = float(inner._global_grad_norm) / scale_now
        else:
            norm = float(inner._global_grad_norm)
        clip_coefficient = max(1.0, (norm + 1e-6) / self.clip) if self.clip > 0 and norm is not None else 1.0
        if self.kind in (EngineKind.ZERO_1_2, EngineKind.ZERO_3):
            return clip_coefficient * scale_now / window_loss_scale
        return clip_coefficient

    def _record_client_clip_norm(self) -> None:
        """ZeRO-0 fp32 clips in engine.clip_fp32_gradients and drops the norm; keep it."""
        from deepspeed.runtime.utils import clip_grad_norm_

        engine = self.engine

        def clip_fp32_gradients() -> None:
            norm = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=self.clip, mpu=engine.mpu)
            self._client_grad_norm = float(norm)

        engine.clip_fp32_gradients = clip_fp32_gradients

    def local_second_moment(self, param: torch.Tensor) -> Optional[tuple[int, int, Optional[torch.Tensor]]]:
        """The Adam ``exp_avg_sq`` this rank holds for ``param``, as (start, numel, values).

        start/numel locate the values in the flattened parameter. ZeRO-0 holds every coordinate;
        ZeRO-1/2/3 hold only this rank's partition (numel 0 where it holds none). None where the
        optimizer has not created the state yet (before its first step).
        """
        if self.kind in (EngineKind.CLIENT, EngineKind.FP16_UNFUSED):
            holder = self._masters[id(param)] if self.kind is EngineKind.FP16_UNFUSED else param
            v = self.client_optimizer.state.get(holder, {}).get("exp_avg_sq")
            return None if v is None else (0, v.numel(), v.reshape(-1))
        if self.kind is EngineKind.ZERO_3:
            from deepspeed.utils import safe_get_local_optimizer_state

            partition = param.partition_numel()
            start = self.dp_rank * partition
            numel = max(0, min(partition, param.ds_numel - start))
            if numel == 0:  # a parameter smaller than the ranks: nothing held here
                return (0, 0, None)
            try:
                v = safe_get_local_optimizer_state(param, "exp_avg_sq")
            except (KeyError, ValueError):
                return None
            return (start, numel, v.reshape(-1)[:numel])
        mapping = getattr(param, "_hp_mapping", None)  # BF16_Optimizer, ZeRO-1/2: None = no fragment here
        if mapping is None:
            return (0, 0, None)
        # Not mapping.optim_fragment: DeepSpeed 0.19.8 links it after the first group's first step,
        # when later groups have no state yet, and never again. Read the flat partition's state.
        flat_partition = self._flat_fp32_partitions[mapping.param_group_index]
        v = self.client_optimizer.state.get(flat_partition, {}).get("exp_avg_sq")
        if v is None:
            return None
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        return (lp.start, lp.numel, v.narrow(0, hp.start, hp.numel))

    def partition_fragments(self, flat: torch.Tensor) -> Optional[tuple[list[torch.Tensor], list[Fragment]]]:
        """The original parameters laid out in ``flat``, a parameter the inner step updates, and the
        fragments of them that ``flat`` holds on this rank (``agvm_ds.optim.PartitionLayout``).

        None where ``flat`` is itself a whole parameter, the same on every rank (ZeRO-0: the client's
        parameter, or FP16_UnfusedOptimizer's fp32 master). ZeRO-1/2 and BF16_Optimizer: ``flat`` is the
        rank's fp32 partition of group g, laid over ``bit16_groups[g]`` (``bf16_groups[g]``); each
        parameter's ``_hp_mapping`` gives its fragment's address in the partition (hp) and in the
        parameter (lp), None where the partition holds none of it. ZeRO-3: ``flat`` is sub-group s's
        fp32 partition, the parameters' partitions of ``partition_numel()`` elements each, in the order
        of ``fp16_groups[s]``; rank r holds elements [r p, r p + p) of each, real below ``ds_numel``.
        """
        if self.kind in (EngineKind.CLIENT, EngineKind.FP16_UNFUSED):
            return None
        inner = self.engine.optimizer
        if self.kind is EngineKind.ZERO_3:
            index = _index_of(flat, inner.fp32_partitioned_groups_flat)
            fragments, start = [], 0
            params = list(inner.fp16_groups[index])
            for k, param in enumerate(params):
                size = param.partition_numel()
                held = max(0, min(size, param.ds_numel - self.dp_rank * size))
                if held:
                    fragments.append(Fragment(k, start, held, self.dp_rank * size))
                start += size
            return params, fragments
        index = _index_of(flat, self._flat_fp32_partitions)
        params = list(inner.bit16_groups[index] if self.kind is EngineKind.ZERO_1_2 else inner.bf16_groups[index])
        fragments = []
        for k, param in enumerate(params):
            mapping = getattr(param, "_hp_mapping", None)
            if mapping is not None and mapping.hp_fragment_address.numel:
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                fragments.append(Fragment(k, hp.start, hp.numel, lp.start))
        return params, fragments

    def check_layerwise(self, name: str) -> None:
        """Refuses, in one line, an engine where a layer-wise optimizer's partitions are not all here."""
        inner = self.engine.optimizer
        if getattr(inner, "cpu_offload", False) or getattr(inner, "offload_optimizer", False):
            raise ValueError(
                f"optimizer.name={name!r}: zero_optimization.offload_optimizer is not supported by the layer-wise "
                "optimizers (their partitions are swapped and stepped outside the layout checked); remove it, "
                "or use adamw/sgd"
            )

    # --- communication and logging ----------------------------------------------------------

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums a small tensor over the data-parallel ranks, logged as ``agvm_stats`` by the comms logger."""
        import deepspeed.comm as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.dp_group, log_name="agvm_stats")
        return tensor

    def all_reduce_norms(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums a layer-wise optimizer's partial squared norms over the data-parallel ranks, logged as
        ``layerwise_norms`` by the comms logger."""
        import deepspeed.comm as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.dp_group, log_name="layerwise_norms")
        return tensor

    def write_monitor(self, events: Iterable[tuple[str, float]]) -> None:
        """Writes scalars through DeepSpeed's monitor (TensorBoard/CSV/W&B), when one is enabled."""
        monitor = getattr(self.engine, "monitor", None)
        if monitor is None or not monitor.enabled:
            return
        step = int(self.engine.global_samples)
        monitor.write_events([(tag, value, step) for tag, value in events])


# --- public entry points ------------------------------------------------------------------------

CLIENT_STATE_KEY = "agvm"


def initialize(
    model: nn.Module,
    optimizer: AGVM,
    config: Union[str, os.PathLike, dict[str, Any]],
    **kwargs: Any,
):
    """``deepspeed.initialize`` for an AGVM optimizer, then ``optimizer.attach`` with the engine's view.

    DeepSpeed accepts a client optimizer under ZeRO only if its type is whitelisted or
    ``zero_allow_untested_optimizer`` is set; AGVM is not on the list, so the key is set here.
    Returns what ``deepspeed.initialize`` returns: (engine, optimizer, dataloader, lr_scheduler).
    """
    import deepspeed

    if not isinstance(config, dict):
        with open(config, encoding="utf-8") as f:
            config = json.load(f)
    config = {"zero_allow_untested_optimizer": True, **config}
    from ..engine.distributed import init_distributed  # imported here: the engine package imports this one

    # What deepspeed.initialize would do first (a no-op when a process group exists), so that the
    # shared-memory name is released before anything below can refuse the configuration.
    init_distributed(dist_backend=kwargs.get("dist_backend"))
    engine, ds_optimizer, dataloader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, **kwargs
    )
    _share_zero3_fp32_partitions(engine)
    view = DeepSpeedView(engine, optimizer)
    optimizer.attach(view)
    _attach_layout(optimizer.base_optimizer, view)
    return engine, ds_optimizer, dataloader, scheduler


def _attach_layout(base: torch.optim.Optimizer, view: DeepSpeedView) -> None:
    """Gives a layer-wise base optimizer (LAMB, LARS) the map from flat partitions to parameters."""
    if isinstance(base, LayerwiseOptimizer):
        view.check_layerwise(type(base).__name__.lower())
        base.attach_layout(view)


def _index_of(flat: torch.Tensor, partitions: list[torch.Tensor]) -> int:
    for index, partition in enumerate(partitions):
        if partition is flat:
            return index
    raise RuntimeError(
        f"AGVM: a flat parameter of {flat.numel()} elements is none of DeepSpeed's fp32 partitions; "
        "DeepSpeed internals changed?"
    )


def _share_zero3_fp32_partitions(engine) -> int:
    """Drops ZeRO-3's second fp32 copy of fp32 weights, as DeepSpeed means to; returns the bytes freed.

    With fp32 weights (fp32, or bf16 through ``torch_autocast``) ZeRO-3 would use the parameter
    partitions themselves as the optimizer's fp32 partitions ("we don't need another copy of the
    weights", ``stage3.py`` ``_create_fp32_partitions``), but its test compares a ``torch.device``
    with the accelerator's device *name*, a string, which is never equal: every rank keeps a copy,
    4 bytes per parameter over the world (2 GB per rank for the 1B SwinV2 on 2 ranks). Here the
    fp32 partition takes the parameter partition's storage; DeepSpeed's own copy from one to the
    other after each step becomes a copy onto itself, and checkpoints hold the same values.

    The padding that rounds each parameter up to a multiple of the world size is left uninitialised
    by DeepSpeed; it is zeroed here, so that two runs write bitwise identical checkpoints.
    """
    import deepspeed.comm as dist

    optimizer = engine.optimizer
    if type(optimizer).__name__ != "DeepSpeedZeroOptimizer_Stage3":
        return 0
    rank = dist.get_rank(group=optimizer.dp_process_group)
    for param in (p for group in optimizer.fp16_groups for p in group):
        size = param.partition_numel()
        held = max(0, min(size, param.ds_numel - rank * size))
        if held < size:
            param.ds_tensor.data.narrow(0, held, size - held).zero_()
    if optimizer.offload_optimizer:
        return 0
    freed = 0
    for low, high in zip(optimizer.fp16_partitioned_groups_flat, optimizer.fp32_partitioned_groups_flat):
        if low is None or low.dtype != high.dtype or low.device != high.device or low.data_ptr() == high.data_ptr():
            continue
        high.data = low.data  # the copy was made from these values: same numbers, one storage
        freed += high.numel() * high.element_size()
    return freed


def _agvm_of(engine) -> AGVM:
    optimizer = engine.basic_optimizer
    if not isinstance(optimizer, AGVM):
        raise TypeError(f"engine's client optimizer is {type(optimizer).__name__}, not AGVM")
    return optimizer


def save_checkpoint(
    engine, save_dir: str, tag: Optional[str] = None, client_state: Optional[dict] = None, **kwargs: Any
) -> None:
    """``engine.save_checkpoint`` with the AGVM state (EMA factors, counters) in the client state.

    The client state also carries the ``universal_checkpoint_info`` that DeepSpeed's
    ``ds_to_universal`` requires, so any checkpoint can be resumed on another number of ranks.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    client_state = {UNIVERSAL_CHECKPOINT_INFO: universal_info, **(client_state or {}),
                    CLIENT_STATE_KEY: _agvm_of(engine).agvm_state_dict()}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, **kwargs)


def load_checkpoint(engine, load_dir: str, tag: Optional[str] = None, **kwargs: Any) -> tuple[Optional[str], dict]:
    """``engine.load_checkpoint`` that also restores the AGVM state; returns (path, client_state)."""
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint found in {load_dir!r} (tag={tag!r})")
    if CLIENT_STATE_KEY not in client_state:
        raise KeyError(f"checkpoint {path!r} has no AGVM state (client_state key {CLIENT_STATE_KEY!r})")
    _agvm_of(engine).load_agvm_state_dict(client_state.pop(CLIENT_STATE_KEY))
    return path, client_state
