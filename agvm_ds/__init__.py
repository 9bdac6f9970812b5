"""agvm-ds: large-batch training of dense visual predictors with AGVM on DeepSpeed."""
from .agvm import (
    AGVM,
    MODULE_KEY,
    AGVMConfig,
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
    "load_detector",
]


def __getattr__(name: str):
    """``agvm_ds.load_detector`` (a file written by agvm-export -> the torchvision model), imported on
    first use so that ``import agvm_ds`` stays free of torchvision and timm."""
    if name == "load_detector":
        from .detection.weights import load_detector

        return load_detector
    raise AttributeError(f"module 'agvm_ds' has no attribute {name!r}")
