"""Helpers shared by the trainer tests: a ZIMAGE_HOME with the tiny model and demo data, fast configs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from zimage.settings import Settings


def make_home(root: Path, tiny_model_dir: Path) -> Settings:
    """A fresh home under `root` with models/base/tiny-zimage and datasets/demo-shapes (no env change)."""
    from zimage.demo import DEMO_DATASET, write_demo_dataset
    from zimage.tiny import TINY_MODEL_NAME

    settings = Settings(home=Path(root)).ensure()
    shutil.copytree(tiny_model_dir, settings.base_models_dir / TINY_MODEL_NAME)
    write_demo_dataset(settings.datasets_dir / DEMO_DATASET)
    return settings


def fast_config(**overrides) -> dict:
    """A flat config that trains the tiny model in about a second on the CPU."""
    config = {
        "model_path": "tiny-zimage",
        "dataset_path": "demo-shapes",
        "resolution": 256,
        "lora_rank": 4,
        "lora_alpha": 4,
        "learning_rate": 1e-3,
        "num_steps": 4,
        "batch_size": 1,
        "gradient_accumulation": 1,
        "optimizer": "adamw",
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "save_dtype": "fp32",
        "save_every_n_steps": 0,
        "sample_every_n_steps": 0,
        "output_name": "test_lora",
    }
    config.update(overrides)
    return config


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread inside the block (the losses are the same either way).

    The tiny model's kernels are a few microseconds each; with two OpenMP threads on a 2-core machine
    that other processes also use, every kernel waits at a barrier for a descheduled thread, which
    measured here makes a training step 5-15x slower. One thread costs ~15% on an idle machine.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_module():
    """Autouse in every module that imports it: the whole module runs with one_torch_thread()."""
    with one_torch_thread():
        yield
