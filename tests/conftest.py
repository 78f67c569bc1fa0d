"""Shared fixtures: tiny seeded models built from code, written once per test session."""

from __future__ import annotations

import os

import pytest

# No test may touch the network: make every Hugging Face client fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """``{arch: (diffusers_dir, single_file)}`` for sd15, sd21, sd21-v and sdxl, built on first use."""
    from nbkit.models.tiny import make_tiny_model

    cache: dict = {}
    root = tmp_path_factory.mktemp("tiny-models")

    def get(arch: str = "sd15"):
        if arch not in cache:
            paths = make_tiny_model(root / f"tiny-{arch}", arch=arch, seed=0, single_file=True)
            cache[arch] = (paths["diffusers"], paths["single_file"])
        return cache[arch]

    return get


@pytest.fixture()
def tiny_pipe():
    """A fresh in-memory tiny pipeline: ``tiny_pipe("sd15")``."""
    from nbkit.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline
