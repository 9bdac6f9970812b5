"""Optimizers of agvm_ds's own that know nothing of DeepSpeed (see ``layerwise``)."""
from .layerwise import Fragment, Lamb, Lars, LayerwiseOptimizer, PartitionLayout

__all__ = ["Fragment", "Lamb", "Lars", "LayerwiseOptimizer", "PartitionLayout"]
