"""Layer-wise LAMB and LARS whose trust ratio is per original parameter tensor, wherever its elements live.

Why this module exists: ZeRO 1-3 and DeepSpeed's bf16 optimizer hand the optimizer one flat fp32
partition per param group (ZeRO-3: per sub-group), cut at arbitrary element boundaries. A layer-wise
optimizer written for whole tensors (timm's ``Lamb``) then computes one trust ratio per (group,
rank's share), and clips gradients over that share: the update changes with the world size and is
not LAMB (DeepSpeed issues #88 and #490).

Here the optimizer asks a ``PartitionLayout`` which fragments of which original tensors each flat
parameter holds, sums the squared norms of the fragments it owns, completes them with ONE all-reduce
per ``step`` call of 2 fp32 numbers per original tensor of the call (batched into one tensor), and
scales each fragment's update by its own tensor's ratio. No tensor is gathered. Without a layout
(plain PyTorch, ZeRO-0) every parameter is an original tensor and nothing is communicated.

No DeepSpeed import: ``agvm_ds.agvm.deepspeed_integration.DeepSpeedView`` is the DeepSpeed layout,
attached by ``agvm_ds.initialize``. No internal gradient clipping: DeepSpeed clips over the global norm.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional, Protocol, Sequence

import torch

__all__ = ["Fragment", "Lamb", "Lars", "LayerwiseOptimizer", "PartitionLayout", "trust_ratio_where_defined"]


class Fragment(NamedTuple):
    """Elements [start, start + numel) of a flat parameter are elements [offset, offset + numel) of
    original tensor ``index`` (flattened) in the layout's tensor list."""

    index: int
    start: int
    numel: int
    offset: int


class PartitionLayout(Protocol):
    """Where the elements of the original tensors are, seen from one rank."""

    def partition_fragments(self, flat: torch.Tensor) -> Optional[tuple[Sequence[torch.Tensor], list[Fragment]]]:
        """(the original tensors laid out in ``flat``'s group, in an order every rank shares; the
        fragments of them that ``flat`` holds on this rank), or None where ``flat`` is itself an
        original tensor, replicated on every rank."""

    def all_reduce_norms(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` in place over the ranks that share the partitions."""


def trust_ratio_where_defined(ratio: torch.Tensor, w_norm: torch.Tensor, d_norm: torch.Tensor) -> torch.Tensor:
    """1 where either norm is 0 (a zero weight or update has no scale to trust), as timm and NVIDIA."""
    return torch.where(w_norm > 0, torch.where(d_norm > 0, ratio, 1.0), 1.0)


class _Plan(NamedTuple):
    first: int  # where this parameter's tensors start in the step's norm table
    fragments: list[Fragment]
    distributed: bool


class LayerwiseOptimizer(torch.optim.Optimizer):
    """One trust ratio per original tensor; subclasses give the direction and the ratio.

    A group adapts when its ``weight_decay`` is non-zero or ``always_adapt`` is set: norms and
    biases (the no-weight-decay groups) keep ratio 1, as in timm's Lamb and Lars.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self._original_shapes = {tuple(p.shape) for group in self.param_groups for p in group["params"]}
        self._layout: Optional[PartitionLayout] = None
        self._plans: dict[int, tuple[Optional[tuple[Sequence[torch.Tensor], list[Fragment]]], torch.Tensor]] = {}

    def attach_layout(self, layout: PartitionLayout) -> None:
        """Tells the optimizer how its (flat) parameters map onto the original tensors."""
        self._layout = layout
        self._plans.clear()

    # --- what subclasses define -------------------------------------------------------------

    def _direction(self, group: dict[str, Any], p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the update before the trust ratio, the tensor whose norm is the ratio's denominator)."""
        raise NotImplementedError

    def _ratio(self, group: dict[str, Any], w_norm: torch.Tensor, d_norm: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, group: dict[str, Any], p: torch.Tensor, update: torch.Tensor) -> None:
        """Applies the trust-scaled update to ``p``."""
        raise NotImplementedError

    # --- the step ---------------------------------------------------------------------------

    def _fragments(self, p: torch.Tensor) -> Optional[tuple[Sequence[torch.Tensor], list[Fragment]]]:
        cached = self._plans.get(id(p))
        if cached is not None and cached[1] is p:
            return cached[0]
        if self._layout is None:
            # A safety net for plain deepspeed.initialize: a flat partition has a shape no original has
            # (mostly). A copy of an original (DeepSpeed's fp32 master) is a whole tensor.
            if tuple(p.shape) not in self._original_shapes:
                raise RuntimeError(
                    f"{type(self).__name__}: stepping a parameter of shape {tuple(p.shape)}, which none of its "
                    "parameters has (a flat ZeRO partition?), with no layout attached: build the engine with "
                    "agvm_ds.initialize, else every trust ratio would be per rank's share"
                )
            fragments = None
        else:
            fragments = self._layout.partition_fragments(p)
        self._plans[id(p)] = (fragments, p)
        return fragments

    def _plan(self) -> tuple[list[tuple[dict[str, Any], torch.Tensor, _Plan]], int, bool]:
        """Every parameter of this call, where its tensors sit in the norm table, and the table's rows.

        Sized by the structure alone (also parameters without a gradient; rows only for groups that
        adapt), so that every rank all-reduces a table of the same size, or none.
        """
        entries, rows, distributed = [], 0, False
        for group in self.param_groups:
            adapts = self._adapts(group)
            for p in group["params"]:
                layout = self._fragments(p)
                if not adapts:  # ratio 1: no norms, no rows, no bytes
                    plan = _Plan(rows, [], False)
                elif layout is None:
                    plan = _Plan(rows, [Fragment(0, 0, p.numel(), 0)], False)
                    rows += 1
                else:
                    tensors, fragments = layout
                    plan = _Plan(rows, fragments, True)
                    rows += len(tensors)
                    distributed = True
                entries.append((group, p, plan))
        return entries, rows, distributed

    def _adapts(self, group: dict[str, Any]) -> bool:
        return group["weight_decay"] != 0 or group.get("always_adapt", False)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries, rows, distributed = self._plan()
        if not entries:
            return loss
        device = entries[0][1].device
        sq_norms = torch.zeros(rows, 2, dtype=torch.float32, device=device)  # (||w||^2, ||d||^2) per tensor
        work = []
        for group, p, plan in entries:
            if p.grad is None:
                continue
            update, denominator = self._direction(group, p)
            if plan.fragments:
                w, d = p.detach().reshape(-1), denominator.reshape(-1)
                for fragment in plan.fragments:
                    row = sq_norms[plan.first + fragment.index]
                    row[0] += torch.linalg.vector_norm(w.narrow(0, fragment.start, fragment.numel),
                                                       dtype=torch.float32).square()
                    row[1] += torch.linalg.vector_norm(d.narrow(0, fragment.start, fragment.numel),
                                                       dtype=torch.float32).square()
            work.append((group, p, plan, update))
        if distributed and rows:
            self._layout.all_reduce_norms(sq_norms)
        norms = sq_norms.sqrt()
        for group, p, plan, update in work:
            if plan.fragments:
                rows_of_p = torch.tensor([plan.first + f.index for f in plan.fragments], device=device)
                ratios = self._ratio(group, norms[rows_of_p, 0], norms[rows_of_p, 1]).to(update.dtype)
                flat = update.reshape(-1)
                for fragment, ratio in zip(plan.fragments, ratios):
                    flat.narrow(0, fragment.start, fragment.numel).mul_(ratio)
            self._apply(group, p, update)
        return loss


class Lamb(LayerwiseOptimizer):
    """LAMB (You et al. 2019), as timm's ``Lamb`` with ``max_grad_norm=None`` (grad averaging,
    L2 weight decay added to the Adam update, ratio ||w|| / ||update||, 1 where a norm is 0).

    ``bias_correction=False`` is NVIDIA's LAMB without Adam's bias correction. The step count is
    per parameter state, so that ZeRO-3 calling ``step`` once per sub-group counts each once.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, bias_correction: bool = True,
                 always_adapt: bool = False) -> None:
        if not lr > 0 or not eps > 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lamb: lr={lr}, eps={eps} must be > 0, weight_decay={weight_decay} >= 0, "
                             f"betas={betas} in [0, 1)")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, always_adapt=always_adapt))

    def _direction(self, group: dict[str, Any], p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if group["bias_correction"]:
            correction1, correction2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
        else:
            correction1, correction2 = 1.0, 1.0
        denom = (exp_avg_sq.sqrt() / (correction2 ** 0.5)).add_(group["eps"])
        update = (exp_avg / correction1).div_(denom)
        if group["weight_decay"] != 0:
            update.add_(p, alpha=group["weight_decay"])
        return update, update

    def _ratio(self, group: dict[str, Any], w_norm: torch.Tensor, d_norm: torch.Tensor) -> torch.Tensor:
        return trust_ratio_where_defined(w_norm / d_norm, w_norm, d_norm)

    def _apply(self, group: dict[str, Any], p: torch.Tensor, update: torch.Tensor) -> None:
        p.add_(update, alpha=-group["lr"])


class Lars(LayerwiseOptimizer):
    """LARS (You et al. 2017), as timm's ``Lars`` without nesterov, dampening or trust clipping:

        ratio = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)   (1 where a norm is 0)
        buf   = momentum * buf + ratio * (g + weight_decay * w)    (buf = the first such term)
        w    -= lr * buf
    """

    def __init__(self, params: Iterable[Any], lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 1e-8, always_adapt: bool = False) -> None:
        if not lr > 0 or not 0 <= momentum < 1 or weight_decay < 0 or not trust_coefficient > 0 or eps < 0:
            raise ValueError(f"Lars: lr={lr} > 0, momentum={momentum} in [0, 1), weight_decay={weight_decay} >= 0, "
                             f"trust_coefficient={trust_coefficient} > 0, eps={eps} >= 0 expected")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, always_adapt=always_adapt))

    def _direction(self, group: dict[str, Any], p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        update = p.grad.clone()
        if self._adapts(group):
            update.add_(p, alpha=group["weight_decay"])
        return update, p.grad

    def _ratio(self, group: dict[str, Any], w_norm: torch.Tensor, d_norm: torch.Tensor) -> torch.Tensor:
        ratio = group["trust_coefficient"] * w_norm / (d_norm + group["weight_decay"] * w_norm + group["eps"])
        return trust_ratio_where_defined(ratio, w_norm, d_norm)

    def _apply(self, group: dict[str, Any], p: torch.Tensor, update: torch.Tensor) -> None:
        if group["momentum"] != 0:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = update.clone()
            else:
                state["momentum_buffer"].mul_(group["momentum"]).add_(update)
            update = state["momentum_buffer"]
        p.add_(update, alpha=-group["lr"])
