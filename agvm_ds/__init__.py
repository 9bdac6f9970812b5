"""agvm-ds: large-batch training of dense visual predictors with AGVM on DeepSpeed."""
from .agvm import (
    AGVM,
    AGVMConfig,
    MODULE_KEY,
    initialize,
    load_checkpoint,
    module_param_groups,
    save_checkpoint,
)

__version__ = "0.1.0"
__all__ = [
    "AGVM",
    "AGVMConfig",
    "MODULE_KEY",
    "initialize",
    "load_checkpoint",
    "module_param_groups",
    "save_checkpoint",
]
