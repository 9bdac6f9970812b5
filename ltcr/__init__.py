"""LTCR: peer-to-peer knowledge transfer among distributed C51 agents (experience reuse + value distillation).

Our implementation of the idea of Xue et al., arXiv 2002.02202 (only its abstract is available; the protocol
and every detail are our design, documented in ltcr/README.md). Independent of ``agvm_ds``.
"""
try:
    import gymnasium  # noqa: F401  (the environments; an optional dependency of agvm-ds)
except ImportError:
    raise ImportError("ltcr needs gymnasium, an optional dependency: pip install 'agvm-ds[ltcr]'") from None

from .agent import C51Agent, DistillationTargets
from .c51 import CategoricalQNetwork, categorical_cross_entropy, project_distribution
from .config import LTCRConfig, load_config
from .transfer import RoundReport, TransferProtocol

__all__ = ["C51Agent", "CategoricalQNetwork", "DistillationTargets", "LTCRConfig", "RoundReport",
           "TransferProtocol", "categorical_cross_entropy", "load_config", "project_distribution"]
