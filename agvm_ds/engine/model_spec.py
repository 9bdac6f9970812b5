"""The model an experiment trains: its definition, the evaluation size its recipe implies, its class
count, and whether it learns masks.

Everything that builds or rebuilds an experiment's model (the trainer, ``--dry-run``, agvm-eval,
agvm-export, agvm-predict, the benchmarks) goes through :func:`experiment_spec` and
:func:`trains_masks`, so that they all build the same network and evaluate at the size training saw.
"""
from __future__ import annotations

from typing import Optional

from ..detection import ModelSpec, load_spec
from .config import ExperimentConfig

__all__ = ["experiment_spec", "trains_masks"]


def experiment_spec(config: ExperimentConfig, num_categories: Optional[int] = None,
                    num_stuff: Optional[int] = None) -> ModelSpec:
    """The spec of ``config.model`` with its overrides, resized for evaluation as the data recipe trains.

    ``num_categories`` (the data set's classes; for panoptic data its thing categories) sets
    ``num_classes``: that plus one for the background of a detector's classifier, that alone for a
    semantic model; ``num_stuff`` sets a panoptic model's ``num_stuff_classes``. Left out, the
    definition's values stay, as defaults for reports made before the data is read.
    A ``model_overrides`` size that conflicts with the recipe's evaluation size is an error.
    """
    spec = load_spec(config.model, config.model_overrides)
    resize = config.data.test_resize()
    if resize is not None:
        given = {k: config.model_overrides[k] for k in ("min_size", "max_size") if k in config.model_overrides}
        derived = {"min_size": resize[0], "max_size": resize[1]}
        conflicts = {k: v for k, v in given.items() if v != derived[k]}
        if conflicts:
            raise ValueError(
                f"model_overrides {conflicts} would evaluate at another size than recipe {config.data.recipe!r} "
                f"trains at: evaluation images are resized to data.test_size={resize[0]} / "
                f"data.test_max_size={resize[1]} (derived from the recipe unless given); drop the model_overrides "
                "sizes, or set data.test_size/test_max_size"
            )
        spec = spec.with_overrides(derived)
    if num_categories is not None:
        background = 0 if spec.task == "semantic" else 1
        spec = spec.with_overrides({"num_classes": num_categories + background})
    if num_stuff is not None and spec.task == "panoptic":
        spec = spec.with_overrides({"num_stuff_classes": num_stuff})
    return spec


def trains_masks(config: ExperimentConfig, spec: ModelSpec) -> bool:
    """Whether the experiment trains (and so evaluates) instance masks of detection data:
    ``data.with_masks`` if set, else whether the detector has a mask head (Mask R-CNN)."""
    return spec.task == "instance" if config.data.with_masks is None else config.data.with_masks
