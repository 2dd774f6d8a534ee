"""Shared fixtures: a temp ZIMAGE_HOME per test and one tiny model built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in every test process and every worker it starts (they inherit the environment). The tiny
# model's kernels take microseconds; with two OpenMP threads on a shared 2-core machine each kernel waits at a
# barrier for a descheduled thread (5-15x slower steps, measured). The losses are the same either way; tests
# run in two processes (pytest -n 2) instead.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny pipeline folder, built once; copy it (or use `zhome_demo`) before writing next to it."""
    from zimage.tiny import write_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "tiny-zimage"
    write_tiny_model(path)
    return path


@pytest.fixture()
def zhome(tmp_path, monkeypatch):
    """An empty ZIMAGE_HOME for one test; returns its Settings."""
    from zimage.settings import get_settings

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("ZIMAGE_HOME", str(home))
    return get_settings().ensure()


@pytest.fixture()
def zhome_demo(zhome, tiny_model_dir):
    """A ZIMAGE_HOME with the tiny model and the demo dataset in place (model copied, not rebuilt)."""
    from zimage.demo import DEMO_DATASET, write_demo_dataset
    from zimage.tiny import TINY_MODEL_NAME

    shutil.copytree(tiny_model_dir, zhome.base_models_dir / TINY_MODEL_NAME)
    write_demo_dataset(zhome.datasets_dir / DEMO_DATASET)
    return zhome


@pytest.fixture()
def zhome_demo_shared_cache(zhome_demo, tmp_path_factory):
    """`zhome_demo` whose latent/text cache is shared with the trainer test modules of this process."""
    shared = tmp_path_factory.getbasetemp() / "zimage-shared-train-cache"
    shared.mkdir(exist_ok=True)
    zhome_demo.cache_dir.symlink_to(shared, target_is_directory=True)
    return zhome_demo


@pytest.fixture(autouse=True)
def _stop_schedulers():
    """A test whose page or code started this host's scheduler (zimage.jobs.ensure_scheduler) stops it after."""
    yield
    import sys

    scheduler = sys.modules.get("zimage.jobs.scheduler")
    if scheduler is not None:
        scheduler.stop_all()
