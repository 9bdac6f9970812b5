"""The evaluation size of a detector, derived from the experiment's training recipe.

Shared by the trainer and by everything that rebuilds a trained model (agvm-eval, agvm-export,
the benchmarks), so that they all evaluate at the size training saw.
"""
from __future__ import annotations

from ..detection import ModelSpec
from .config import ExperimentConfig

__all__ = ["evaluation_sized"]


def evaluation_sized(spec: ModelSpec, config: ExperimentConfig) -> ModelSpec:
    """The spec with the model's (evaluation) resize set from the data recipe, so that evaluation
    sees images at the scale training saw them; a conflicting ``model_overrides`` size is an error."""
    resize = config.data.test_resize()
    if resize is None:
        return spec
    given = {k: config.model_overrides[k] for k in ("min_size", "max_size") if k in config.model_overrides}
    derived = {"min_size": resize[0], "max_size": resize[1]}
    conflicts = {k: v for k, v in given.items() if v != derived[k]}
    if conflicts:
        raise ValueError(
            f"model_overrides {conflicts} would evaluate at another size than recipe {config.data.recipe!r} trains at: "
            f"evaluation images are resized to data.test_size={resize[0]} / data.test_max_size={resize[1]} "
            "(derived from the recipe unless given); drop the model_overrides sizes, or set data.test_size/test_max_size"
        )
    return spec.with_overrides(derived)
