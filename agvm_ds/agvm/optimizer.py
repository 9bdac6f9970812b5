"""AGVM as an optimizer wrapper that DeepSpeed drives like any client optimizer.

Paper: "Large-batch Optimization for Dense Visual Predictions", Xue et al., NeurIPS 2022
(arXiv 2210.11078).

Update rule, for each AGVM module i (backbone, fpn, rpn, heads, ...) at iteration t in
[start_iter, stop_iter]:

    lr_i(t) = mu_i * lr_i(t)                     for the base step only; the scheduled lr is restored
    mu_i   <- ema * mu_i + (1 - ema) * sqrt(clamp(phi_anchor / phi_i, clamp_min, clamp_max))
                                                 every ``interval`` iterations

phi_i is the expected 1 - cos between the module's gradients on two halves of the global batch,
estimated from two scalars per module (see ``estimator.py``): per-micro-batch squared norms, taken
by tensor hooks on the parameters as backward runs, and the squared norm of the reduced gradient,
taken inside the step from whatever (partitioned) gradient DeepSpeed hands the base optimizer.
The only communication is one all-reduce of 2 x num_modules floats per statistics step.

A factor is applied in the same step only from the next measurement on: the EMA updated at step t
uses gradients of step t and scales the learning rate from step t + 1. ZeRO-1/2/3 step one group
(or sub-group) at a time, so every module's statistic is complete only after the last inner call.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

from .config import AGVMConfig
from .estimator import GradientMoments
from .grouping import MODULE_KEY
from .modulator import GradientVarianceModulator

if TYPE_CHECKING:  # the adapter imports this module; this one needs only the view's type
    from .deepspeed_integration import DeepSpeedView

__all__ = ["AGVM"]

logger = logging.getLogger(__name__)

#: Elements preconditioned at a time. ZeRO hands the step whole flat partitions (half a billion
#: elements per rank for a 1B model on 2 ranks): g / (sqrt(v) + eps) in one piece would allocate
#: three temporaries of that size, gigabytes more than the model states themselves.
PRECONDITION_CHUNK = 1 << 24

#: What the statistics' work is called in a ``torch.profiler`` trace (benchmarks/billion.py splits a step by it).
PROFILE_REGION = "agvm_statistics"


def preconditioned_sq_norm(grad: torch.Tensor, exp_avg_sq: torch.Tensor, eps: float) -> torch.Tensor:
    """||g / (sqrt(v) + eps)||^2 in fp32, with no temporary larger than ``PRECONDITION_CHUNK`` elements."""
    grad, exp_avg_sq = grad.reshape(-1), exp_avg_sq.reshape(-1)
    pieces = zip(grad.split(PRECONDITION_CHUNK), exp_avg_sq.split(PRECONDITION_CHUNK))
    norms = [torch.linalg.vector_norm(g.float() / (v.sqrt() + eps), dtype=torch.float32) for g, v in pieces]
    return torch.stack(norms).square().sum() if norms else grad.new_zeros((), dtype=torch.float32)


class AGVM(torch.optim.Optimizer):
    """Adaptive Gradient Variance Modulator around a base optimizer (SGD, AdamW, ...).

    Args:
        optimizer: the base optimizer; each of its param groups names its AGVM module under
            ``MODULE_KEY`` (``module_param_groups`` builds such groups).
        config: AGVM hyper-parameters.

    Use: build it before ``deepspeed.initialize`` and pass it as the optimizer; then ``attach`` the
    engine (``agvm_ds.initialize`` does both). Until attached it steps the base optimizer unchanged.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: Optional[AGVMConfig] = None) -> None:
        # Not calling Optimizer.__init__: groups and state are the base optimizer's, shared by reference.
        self.base_optimizer = optimizer
        self.config = config or AGVMConfig()
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

        module_names: list[str] = []
        self._param_modules: list[tuple[torch.Tensor, int, float]] = []
        for index, group in enumerate(optimizer.param_groups):
            module = group.get(MODULE_KEY)
            if not isinstance(module, str):
                raise ValueError(
                    f"AGVM: param group {index} (name={group.get('name')!r}) has no {MODULE_KEY!r} key; "
                    "build the groups with agvm_ds.module_param_groups"
                )
            if module not in module_names:
                module_names.append(module)
            self._param_modules += [(p, module_names.index(module), group.get("eps", 1e-8)) for p in group["params"]]
        self.modulator = GradientVarianceModulator(module_names, self.config)
        self._module_index = {name: i for i, name in enumerate(module_names)}

        self.iteration = 0
        self.last_moments: Optional[GradientMoments] = None
        self._view = None
        self._hook_handles: list[Any] = []
        self._collecting = False
        self._calls_in_step = 0
        self._step_window = -1
        self._reset_accumulators()

    # --- the base optimizer's groups and state, by reference (DeepSpeed reassigns them) ---------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = groups

    @property
    def state(self):
        return self.base_optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.base_optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.base_optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.base_optimizer.defaults = defaults

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("AGVM: modules are fixed at construction; build all groups up front")

    def __repr__(self) -> str:
        return f"AGVM(modules={self.modulator.module_names}, {self.config}, base={self.base_optimizer!r})"

    # --- engine -----------------------------------------------------------------------------

    @property
    def module_names(self) -> list[str]:
        return self.modulator.module_names

    def attach(self, view: "DeepSpeedView") -> None:
        """Connects to the DeepSpeed engine that wraps this optimizer, through its ``DeepSpeedView``
        (built by ``agvm_ds.initialize``), and starts measuring."""
        if self._view is not None:
            raise RuntimeError("AGVM: already attached to an engine")
        self._view = view
        if self._view.num_micro_batches < 2 and self.config.enabled:
            logger.warning(
                "AGVM: one micro-batch gradient per step (1 data-parallel rank, no gradient accumulation): "
                "gradient variance cannot be estimated, all factors stay 1"
            )
        if self.config.precondition and view.optimizer_state_on_nvme:
            raise ValueError(
                "AGVM: precondition=True reads Adam's second moment during backward, which ZeRO-Infinity "
                "keeps on NVMe (offload_optimizer.device=nvme); set agvm.precondition=false, or offload "
                "the optimizer to cpu"
            )
        if self.config.precondition and not all("betas" in g for g in self.param_groups):
            raise ValueError(
                "AGVM: precondition=True needs an Adam-type base optimizer (exp_avg_sq state), "
                f"got {type(self.base_optimizer).__name__}"
            )
        for param, module_index, eps in self._param_modules:
            self._hook_handles.append(param.register_hook(self._make_grad_hook(param, module_index, eps)))
        self._collecting = self._is_measuring(self.iteration)

    def _is_measuring(self, iteration: int) -> bool:
        if self.config.precondition and iteration == 0:
            return False  # no second moment before the first step
        return self.config.is_stats_iter(iteration) and self._view is not None and self._view.num_micro_batches >= 2

    def _reset_accumulators(self) -> None:
        self._local_sq_window = -1
        self._local_sq: Optional[torch.Tensor] = None
        self._reduced_sq: Optional[torch.Tensor] = None
        self._window_loss_scale = 1.0
        self._hook_multiplier = 1.0

    def _make_grad_hook(self, param: torch.Tensor, module_index: int, eps: float) -> Callable[[torch.Tensor], None]:
        def accumulate_local_sq_norm(grad: torch.Tensor) -> None:
            if not self._collecting:
                return
            window = self._view.window()
            if window != self._local_sq_window:  # first backward of a window: forget a skipped one
                self._local_sq_window = window
                self._local_sq = torch.zeros(len(self.module_names), dtype=torch.float64, device=grad.device)
                self._window_loss_scale = self._view.loss_scale()
                self._hook_multiplier = self._view.hook_grad_multiplier(self._window_loss_scale) ** 2
            with torch.profiler.record_function(PROFILE_REGION):
                if self.config.precondition:
                    sq = self._preconditioned_local_sq_norm(param, grad, eps)
                else:
                    sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
                self._local_sq[module_index] += sq * self._hook_multiplier

        return accumulate_local_sq_norm

    def _preconditioned_local_sq_norm(self, param: torch.Tensor, grad: torch.Tensor, eps: float) -> torch.Tensor:
        """||g / (sqrt(v) + eps)||^2 over the coordinates whose v this rank holds (all of them in ZeRO-0).

        With partitioned optimizer state each rank preconditions only the coordinates it owns, so
        the sum over ranks holds every coordinate once per micro-step: an unbiased, communication-
        free estimate of the mean ||D g||^2 (``_measure`` divides it by the micro-steps per rank).
        v is the second moment of the previous step, the same for both moments of one measurement.
        """
        held = self._view.local_second_moment(param)
        if held is None:
            raise RuntimeError(
                f"AGVM: precondition=True but no exp_avg_sq for a parameter of shape {tuple(grad.shape)}")
        start, numel, v = held
        if numel == 0:
            return grad.new_zeros((), dtype=torch.float32)
        return preconditioned_sq_norm(grad.reshape(-1).narrow(0, start, numel), v, eps)

    # --- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        view = self._view
        if view is None or not self.config.enabled:
            return self.base_optimizer.step(closure)
        window = view.window()
        if window != self._step_window:
            if self._calls_in_step:
                raise RuntimeError(
                    f"AGVM: expected {view.inner_calls_per_step} inner step call(s) per optimizer step "
                    f"({view.kind.value}), saw {self._calls_in_step}; DeepSpeed internals changed?"
                )
            self._step_window = window
        groups = self.param_groups
        if self._collecting:
            with torch.profiler.record_function(PROFILE_REGION):
                self._add_reduced_sq_norms(groups)

        scheduled_lrs = [group["lr"] for group in groups]
        if self.config.is_active(self.iteration):
            for group in groups:
                group["lr"] = group["lr"] * float(self.modulator.factors[self._module_index[group[MODULE_KEY]]])
        try:
            loss = self.base_optimizer.step(closure)
        finally:
            for group, lr in zip(groups, scheduled_lrs):
                group["lr"] = lr

        self._calls_in_step += 1
        if self._calls_in_step == view.inner_calls_per_step:
            self._end_step()
        return loss

    def _add_reduced_sq_norms(self, groups: list[dict[str, Any]]) -> None:
        view = self._view
        if not view.grads_partitioned and view.dp_rank != 0:
            return  # replicated gradients: rank 0 speaks for all
        if self._reduced_sq is None:
            device = next((p.grad.device for g in groups for p in g["params"] if p.grad is not None), None)
            self._reduced_sq = torch.zeros(len(self.module_names), dtype=torch.float64, device=device)
        multiplier = view.inner_grad_multiplier(self._window_loss_scale) ** 2
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self.config.precondition:  # the step's v is still the previous one, as in the hooks
                sq = torch.stack([preconditioned_sq_norm(p.grad, self.state[p]["exp_avg_sq"], group["eps"])
                                  for p in params]).sum()
            else:
                sq = torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params]).square().sum()
            self._reduced_sq[self._module_index[group[MODULE_KEY]]] += sq * multiplier

    def _end_step(self) -> None:
        view = self._view
        if self._collecting:
            with torch.profiler.record_function(PROFILE_REGION):
                self._measure(view)
        self.iteration += 1
        self._calls_in_step = 0
        self._reset_accumulators()
        self._collecting = self._is_measuring(self.iteration)

    def _measure(self, view) -> None:
        n = len(self.module_names)
        device = view.device
        local_sq = self._local_sq if self._local_sq_window == self._step_window else None
        packed = torch.zeros(2 * n, dtype=torch.float64, device=device)
        if local_sq is not None:
            packed[:n] = local_sq.to(device)
        if self._reduced_sq is not None:
            packed[n:] = self._reduced_sq.to(device)
        view.all_reduce_sum(packed)
        packed = packed.cpu()
        stratified = self.config.precondition and view.grads_partitioned  # state is partitioned alike
        samples_summed = view.grad_accumulation_steps if stratified else view.num_micro_batches
        self.last_moments = GradientMoments(packed[:n] / samples_summed, packed[n:], view.num_micro_batches)
        if self.modulator.update(self.last_moments):
            if self.modulator.held_modules():
                logger.info("AGVM guard: factors of %s held at iteration %d (gradient norm or phi off its level)",
                            ", ".join(self.modulator.held_modules()), self.iteration)
            view.write_monitor(
                (f"AGVM/{key}/{module}", value)
                for module, values in self.modulator.as_dict().items()
                for key, value in values.items()
            )
        else:
            logger.warning("AGVM: non-finite gradient statistics at iteration %d; factors kept", self.iteration)

    # --- what users read and checkpoint -----------------------------------------------------

    def statistics(self) -> dict[str, dict[str, float]]:
        """Latest factor, phi and noise scale per module (phi and noise scale are nan before the first measurement)."""
        return self.modulator.as_dict()

    @property
    def factors(self) -> dict[str, float]:
        return {name: float(f) for name, f in zip(self.module_names, self.modulator.factors)}

    def agvm_state_dict(self) -> dict[str, Any]:
        """AGVM's own state (identical on every rank); DeepSpeed checkpoints it as client state."""
        return {"iteration": self.iteration, "config": self.config.to_dict(), "modulator": self.modulator.state_dict()}

    def load_agvm_state_dict(self, state: Mapping[str, Any]) -> None:
        self.modulator.load_state_dict(state["modulator"])
        self.iteration = int(state["iteration"])
        self._reset_accumulators()
        self._collecting = self._is_measuring(self.iteration)
