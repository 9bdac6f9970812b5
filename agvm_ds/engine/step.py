"""One optimizer step: forward, non-finite-loss skip, backward and DeepSpeed step over a window of
micro-batches, with at most one host synchronisation.

Why one function: the trainer, ``benchmarks/throughput.py`` and the large-batch tools all call
:meth:`StepRunner.run_step`, so a benchmark times exactly what a training run does.

Why the skip is deferred: reading a loss on the host (``.item()``) before each backward stalls a
GPU's queue once per micro-batch. Here each micro-batch's finiteness stays on the device (one
all-reduce of a flag, so every rank skips alike) until the micro-batch that DeepSpeed would end the
window with. Before *its* backward the host reads the flags of the whole window, and on logging
steps the loss sums, in one transfer: the only host synchronisation of a step. It cannot move later:
the boundary backward reduces the gradients across ranks and the step updates the weights (Adam's
moments and weight decay move them even for a zero gradient), so the host must know by then.

Why the skip stays exact: a micro-batch whose loss is non-finite on any rank must leave no trace.
  * Backward passes of micro-batches not yet checked run with a device-side gate on every parameter
    gradient (:class:`NonFiniteGuard`, hooks registered before AGVM's): a non-finite micro-batch
    contributes exact zeros, even where 0 x NaN activations would give NaN, so neither the
    accumulated gradients nor AGVM's per-micro-batch squared norms change (adding 0 is exact).
  * BatchNorm running statistics are put back on the device right after the forward pass.
  * DeepSpeed counted the skipped micro-batch as a micro-step: after the check the counter is
    lowered by the number skipped, so the window still ends after ``gradient_accumulation_steps``
    finite micro-batches, as when the host skipped each before its backward, and AGVM's estimate
    still divides by finite micro-batches only.
  * The loss sums for logging add ``where(finite, loss, 0)``: bitwise the sum of the finite ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .buffers import RunningStatsSnapshot

__all__ = ["MicroBatch", "NonFiniteGuard", "StepResult", "StepRunner", "TrainingDiverged"]

logger = logging.getLogger("agvm_ds")


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for ``train.max_consecutive_skips`` micro-batches in a row."""


@dataclass
class MicroBatch:
    """One rank's micro-batch; ``seed`` (if given) seeds torch's RNG before its forward pass (proposal
    sampling), so that a resumed run replays it."""

    images: list[torch.Tensor]
    targets: list[dict[str, Any]]
    seed: Optional[int] = None


@dataclass
class StepResult:
    """What one :meth:`StepRunner.run_step` call did.

    ``stepped`` is False when the micro-batches ran out before the window was complete (the window
    then continues in the next call). ``images`` counts this rank's images consumed, skipped ones
    included. ``losses`` is the mean of each loss over the finite micro-batches since the last logged
    step, on steps run with ``log=True`` only.
    """

    stepped: bool
    images: int
    losses: Optional[dict[str, float]] = None


class NonFiniteGuard:
    """Skips micro-batches whose loss is non-finite on any rank, without reading the loss on the host.

    Build it on the model before ``agvm_ds.initialize``: its gradient hooks must run before AGVM's
    (which ``initialize`` registers), so that AGVM measures the gated gradients.
    """

    def __init__(self, model: nn.Module, max_consecutive_skips: int) -> None:
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0
        self.running_stats = RunningStatsSnapshot(model)
        self._gate: Optional[torch.Tensor] = None  # the flag of the backward running now, None: no gate
        for param in model.parameters():
            if param.requires_grad:
                param.register_hook(self._gated)

    def _gated(self, grad: torch.Tensor) -> Optional[torch.Tensor]:
        if self._gate is None:
            return None
        return torch.where(self._gate, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    def finite_everywhere(self, loss: torch.Tensor) -> torch.Tensor:
        """A device flag: the loss is finite on every rank (a 1-float all-reduce, no host read)."""
        import deepspeed.comm as dist

        finite = torch.isfinite(loss.detach()).float().reshape(1)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite[0] > 0

    def backward_gated(self, engine, loss: torch.Tensor, finite: torch.Tensor) -> None:
        """Backward of a micro-batch not yet checked: its gradients count only if ``finite``."""
        self._gate = finite
        try:
            engine.backward(loss)
        finally:
            self._gate = None

    def count(self, finite: bool, iteration: int, values: dict[str, float], report: Callable[[str], None]) -> None:
        """Books one checked micro-batch; raises TrainingDiverged at ``max_consecutive_skips`` in a row."""
        if finite:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive_skips:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} consecutive micro-batches had a non-finite loss "
                f"(train.max_consecutive_skips={self.max_consecutive_skips}; the last at iteration {iteration}: "
                f"{values})")
        report(f"non-finite loss at iteration {iteration} ({values}): micro-batch skipped on every rank")


@dataclass
class _Unchecked:
    """A micro-batch whose finiteness the host has not read yet."""

    finite: torch.Tensor  # device flag
    losses: torch.Tensor  # its loss values, named by ``names``
    names: tuple[str, ...]
    backward_done: bool = False


class StepRunner:
    """Runs optimizer steps of a DeepSpeed engine (built by ``builders.build_step_runner``).

    Args:
        engine: the DeepSpeed engine (with AGVM).
        guard: the non-finite-loss guard, or None to train on whatever the loss is.
        report: where skip messages go (default: the ``agvm_ds`` logger).
    """

    def __init__(self, engine, guard: Optional[NonFiniteGuard], report: Optional[Callable[[str], None]] = None) -> None:
        self.engine = engine
        self.guard = guard
        self.report = report or logger.info
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else (
            torch.float16 if engine.fp16_enabled() else torch.float32)
        self.window_losses: dict[str, torch.Tensor] = {}  # sums since the last logged step, on the device
        self.window_micro_batches = 0
        self._unchecked: list[_Unchecked] = []
        self._host_sums: dict[str, float] = {}  # the window's sums as last read by the host

    @property
    def skipped_nonfinite(self) -> int:
        return self.guard.skipped if self.guard is not None else 0

    @skipped_nonfinite.setter
    def skipped_nonfinite(self, value: int) -> None:
        if self.guard is not None:
            self.guard.skipped = value

    def run_step(self, micro_batches: Iterable[MicroBatch], log: bool = False) -> StepResult:
        """Consumes micro-batches until one optimizer step is taken, or until they run out.

        ``log`` asks for the mean losses since the last logged step (read in the step's one host
        synchronisation; without a guard, the only one, and none on steps without ``log``).
        """
        images = 0
        for batch in micro_batches:
            images += len(batch.images)
            loss_dict = self._forward(batch)
            loss = sum(loss_dict.values())
            stepped = (self._backward_and_step(loss, loss_dict) if self.guard is None
                       else self._guarded_backward_and_step(loss, loss_dict, log))
            if stepped:
                if log and self.guard is None:
                    self._read_window_sums()
                return StepResult(True, images, self._window_means() if log else None)
        if self._unchecked:  # a window cut by the end of the data: book its skips now
            self._check(log=False)
        return StepResult(False, images)

    # --- the parts of a micro-batch -------------------------------------------------------------

    def _forward(self, batch: MicroBatch) -> dict[str, torch.Tensor]:
        if batch.seed is not None:
            torch.manual_seed(batch.seed)
        device = self.engine.device
        images = [image.to(device, self.dtype) for image in batch.images]
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch.targets]
        if self.guard is not None:
            self.guard.running_stats.take()
        return self.engine(images, targets)

    def _backward_and_step(self, loss: torch.Tensor, loss_dict: Optional[dict[str, torch.Tensor]] = None) -> bool:
        """Backward and DeepSpeed step of a micro-batch known to count (``loss_dict``: add it to the
        window's sums, which the guarded path has done already); True if it ended the window."""
        step_before = self.engine.global_steps
        self.engine.backward(loss)
        self.engine.step()
        if loss_dict is not None:
            self._add_to_window(loss_dict)
        self.window_micro_batches += 1
        return self.engine.global_steps != step_before

    def _guarded_backward_and_step(self, loss: torch.Tensor, loss_dict: dict[str, torch.Tensor], log: bool) -> bool:
        """The guarded path of one micro-batch; True if it ended the window."""
        guard, engine = self.guard, self.engine
        finite = guard.finite_everywhere(loss)
        self._add_to_window(loss_dict, finite)
        entry = _Unchecked(finite, torch.stack([v.detach().float() for v in loss_dict.values()]), tuple(loss_dict))
        self._unchecked.append(entry)
        if not engine.is_gradient_accumulation_boundary():
            guard.backward_gated(engine, loss, finite)
            guard.running_stats.keep_if(finite)  # after backward, which may read the statistics
            engine.step()
            entry.backward_done = True
            return False
        if not self._check(log):
            guard.running_stats.restore()
            return False  # skipped: the window ends with a later micro-batch
        return self._backward_and_step(loss)  # known finite everywhere: no gate

    def _check(self, log: bool) -> bool:
        """The step's host synchronisation: reads every unchecked flag (and, with ``log``, the window's
        loss sums) in one transfer, books the skips, moves DeepSpeed's micro-step counter back by the
        skipped micro-batches it counted; True if the last unchecked micro-batch is finite."""
        unchecked, self._unchecked = self._unchecked, []
        rows = [torch.cat([u.finite.float().reshape(1), u.losses]) for u in unchecked]
        sums = [v.detach().float().reshape(1) for v in self.window_losses.values()] if log else []
        host = torch.cat([*rows, *sums]).tolist()
        if log:
            self._host_sums = dict(zip(self.window_losses, host[len(host) - len(sums):]))
        finite, offset = True, 0
        for entry in unchecked:
            row, offset = host[offset:offset + 1 + len(entry.names)], offset + 1 + len(entry.names)
            finite = row[0] > 0
            self.guard.count(finite, self.engine.global_steps, dict(zip(entry.names, row[1:])), self.report)
            if entry.backward_done:
                if finite:
                    self.window_micro_batches += 1
                else:
                    self.engine.micro_steps -= 1  # DeepSpeed counted it; the window waits for a finite one
        return finite

    # --- loss sums for logging -------------------------------------------------------------------

    def _add_to_window(self, loss_dict: dict[str, torch.Tensor], finite: Optional[torch.Tensor] = None) -> None:
        """Adds the losses to the device-side sums; a non-finite micro-batch adds exact zeros."""
        for name, value in loss_dict.items():
            value = value.detach()
            if finite is not None:
                value = torch.where(finite, value, torch.zeros((), dtype=value.dtype, device=value.device))
            self.window_losses[name] = self.window_losses.get(name, 0.0) + value

    def _read_window_sums(self) -> None:
        """The unguarded path's one transfer, on logged steps only."""
        self._host_sums = dict(zip(self.window_losses, torch.stack(
            [v.float() for v in self.window_losses.values()]).tolist()))

    def _window_means(self) -> dict[str, float]:
        """The mean of each loss over the window's finite micro-batches; starts a new window."""
        count = max(self.window_micro_batches, 1)
        means = {name: total / count for name, total in self._host_sums.items()}
        self.window_losses, self.window_micro_batches, self._host_sums = {}, 0, {}
        return means
