"""Shared fixtures: a demo model root written once per session, and engines over it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for `scripts.*`

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_volume(tmp_path_factory) -> Path:
    """A model root with tiny random checkpoints of every architecture, LoRAs and embeddings."""
    from scripts.make_demo_volume import make_demo_volume

    root = tmp_path_factory.mktemp("volume")
    make_demo_volume(root, include_all=True)
    return root


@pytest.fixture(scope="session")
def settings(demo_volume):
    from handler.settings import Settings

    return Settings(models_dir=str(demo_volume), extra_roots=(), device="cpu")


@pytest.fixture(scope="session")
def engine(settings):
    """One engine for the session (its cache holds two checkpoints)."""
    from dataclasses import replace

    from handler.engine import Engine

    return Engine(replace(settings, gpu_checkpoints=2, cpu_checkpoints=2))


@pytest.fixture(scope="module")
def cuda_engines(settings):
    """A graphed and an eager engine on CUDA, per test module (the GPU tests)."""
    from dataclasses import replace

    from handler.engine import Engine

    on_gpu = replace(settings, device="cuda", gpu_checkpoints=1, cpu_checkpoints=2)
    return Engine(on_gpu), Engine(replace(on_gpu, cuda_graphs=False))
