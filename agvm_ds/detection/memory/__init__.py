"""How much memory one GPU (rank) needs to train a detector: a plan from ZeRO's arithmetic and a
measured forward/backward (``agvm-model-info MODEL --plan``).

A rank holds two kinds of memory, and they are planned differently: the **model states** (parameters,
gradients, optimizer moments, fp32 master weights, DeepSpeed's buffers) follow from the parameter count
and DeepSpeed's code, so they are arithmetic (:mod:`.model_states`); the **activations** depend on every
op of the model, so they are measured by running the training forward and backward on tensors without
data (:mod:`.activations`, with :mod:`.live_bytes` counting live storages and :mod:`.cuda_autocast`
giving CPU tensors CUDA's autocast policy). :mod:`.plan` combines the two per configuration.
"""
from .activations import ActivationProfile, measure_activations, synthetic_targets
from .cuda_autocast import CUDA_AUTOCAST_POLICY, cuda_autocast_policy
from .live_bytes import LiveBytes
from .model_states import (
    OPTIMIZER_MOMENTS,
    PRECISIONS,
    GiB,
    ParamStats,
    StateLine,
    ZeroSetup,
    deepspeed_estimate,
    model_states,
    param_stats,
)
from .plan import PlanRow, fits, format_plan, gpu_peak, plan, plan_notes

__all__ = [
    "ActivationProfile", "CUDA_AUTOCAST_POLICY", "GiB", "LiveBytes", "OPTIMIZER_MOMENTS", "PRECISIONS", "ParamStats",
    "PlanRow", "StateLine", "ZeroSetup", "cuda_autocast_policy", "deepspeed_estimate", "fits", "format_plan",
    "gpu_peak", "measure_activations", "model_states", "param_stats", "plan", "plan_notes", "synthetic_targets",
]
