"""A ZIMAGE_HOME whose latent/text cache is shared by every trainer test module of the session.

Encoding the demo dataset is the slow part of a tiny run; the modules that test checkpoints, control,
samples and data-parallel runs are about the run folder, so they encode once per session.
"""

from __future__ import annotations

from pathlib import Path

from train_support import make_home

from zimage.settings import Settings


def home_with_shared_cache(tmp_path_factory, tiny_model_dir: Path, name: str) -> Settings:
    settings = make_home(tmp_path_factory.mktemp(name) / "home", tiny_model_dir)
    shared = tmp_path_factory.getbasetemp() / "zimage-shared-train-cache"
    shared.mkdir(exist_ok=True)
    settings.cache_dir.symlink_to(shared, target_is_directory=True)
    return settings
