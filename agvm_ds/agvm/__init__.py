"""AGVM: per-module learning-rate modulation from cross-rank gradient variance."""
from .config import AGVMConfig
from .deepspeed_integration import initialize, load_checkpoint, save_checkpoint
from .estimator import GradientMoments, moments_from_gradients, noise_scale, variance_proxy
from .grouping import MODULE_KEY, assign_modules, module_param_groups
from .modulator import GradientVarianceModulator, target_factors
from .optimizer import AGVM

__all__ = [
    "AGVM",
    "AGVMConfig",
    "GradientMoments",
    "GradientVarianceModulator",
    "MODULE_KEY",
    "assign_modules",
    "initialize",
    "load_checkpoint",
    "module_param_groups",
    "moments_from_gradients",
    "noise_scale",
    "save_checkpoint",
    "target_factors",
    "variance_proxy",
]
