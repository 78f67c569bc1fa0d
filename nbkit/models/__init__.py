"""Stable Diffusion models: loading from any source, shipped configs, tiny test models."""

from nbkit.models.load import ModelInfo, load_pipeline

__all__ = ["ModelInfo", "load_pipeline"]
