"""The training system around AGVM: experiment configs, the DeepSpeed training loop, plots."""
from .config import ExperimentConfig, load_config
from .schedule import lr_multiplier, peak_lr

__all__ = ["ExperimentConfig", "load_config", "lr_multiplier", "peak_lr"]
