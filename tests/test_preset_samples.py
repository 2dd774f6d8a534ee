"""Every shipped preset shows what a run did: it draws at least one sample image (quick_test included)."""

from __future__ import annotations

import json

import pytest
from shared_cache import home_with_shared_cache
from train_support import fast_config, one_thread_per_module  # noqa: F401 - autouse

from zimage.config import PRESETS, build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training.runner import run_training

SAMPLING = ("sample_every_n_steps", "sample_steps", "sample_cfg", "sample_prompt", "sample_prompts")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_samples_at_least_once(name):
    config = build_config(preset=name)
    # The trainer samples at step 0 and at the end of a completed run whenever sampling is on (trainer.py),
    # so sample_every_n_steps > 0 means at least one sample however many steps the person chooses.
    assert config.sample_every_n_steps > 0, f"{name}: samples are off"
    assert config.sample_every_n_steps <= config.num_steps, f"{name}: the first periodic sample is after the end"


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return home_with_shared_cache(tmp_path_factory, tiny_model_dir, "preset-samples")


def test_a_quick_test_run_leaves_a_sample_at_its_end(home, tmp_path):
    # quick_test's own sampling fields; only size and length shrink so the tiny model runs it in seconds.
    raw = {k: v for k, v in fast_config(num_steps=3, output_name="quick", sample_resolution=64).items()
           if k not in SAMPLING}  # fmt: skip
    resolved = validate_config(build_config(raw, preset="quick_test"), home)
    assert resolved.config.sample_every_n_steps == PRESETS["quick_test"]["sample_every_n_steps"]
    run = RunFolder(tmp_path / "run")
    run.write_config(resolved.config.to_dict())
    assert run_training(resolved, home, run.path) == 0, run.read_status().get("traceback")
    records = [json.loads(line) for line in run.samples_path.read_text().splitlines()]
    assert [(r["step"], r["reason"]) for r in records] == [(0, "baseline"), (3, "end")]
    assert all((run.path / r["path"]).is_file() for r in records)
