"""Configs refuse what cannot train: finite numbers, ints inside the code's limits, no control characters,
output folders inside ZIMAGE_HOME (or an admin's root), and a warning when the estimate cannot fit."""

from __future__ import annotations

import json
import math
import os

import pytest
from train_support import fast_config, make_home

from zimage.cli import main
from zimage.config import ConfigError, MachineInfo, build_config, read_config_file, validate_config
from zimage.config.limits import INT_LIMITS
from zimage.settings import Settings
from zimage.training.memory_fit import with_memory_warning

CPU = MachineInfo(cuda=False, bf16=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir) -> Settings:
    return make_home(tmp_path_factory.mktemp("limits") / "home", tiny_model_dir)


def problems_of(settings: Settings, **overrides) -> list:
    """Every problem of fast_config(**overrides); [] when it validates."""
    try:
        validate_config(build_config(fast_config(**overrides)), settings, CPU)
    except ConfigError as exc:
        return exc.problems
    return []


def named(problems: list, field: str) -> list[str]:
    return [str(p) for p in problems if p.field == field]


# -- floats -------------------------------------------------------------------------------------------
def test_infinite_learning_rate_from_yaml_is_refused_with_the_field_named(home, tmp_path):
    path = tmp_path / "inf.yaml"
    path.write_text("learning_rate: .inf\n")
    raw = read_config_file(path)
    assert raw["learning_rate"] == math.inf  # YAML's .inf really is infinity, and it used to pass
    (text,) = named(problems_of(home, **raw), "learning_rate")
    assert text.startswith("learning_rate = inf") and "finite" in text and "> 0 and <= 3.4e+38" in text


@pytest.mark.parametrize("field", ["learning_rate", "weight_decay", "max_grad_norm", "lora_alpha", "logit_mean"])
def test_nan_is_refused_in_every_float_field(home, field):
    (text,) = named(problems_of(home, **{field: math.nan}), field)
    assert text.startswith(f"{field} = nan") and "must be a finite number" in text


def test_json_infinity_and_nan_are_refused_by_the_cli_before_any_folder(home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZIMAGE_HOME", str(home.home))
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(fast_config(learning_rate=math.inf, caption_dropout=math.nan)))  # Infinity / NaN
    before = sorted(p.name for p in home.runs_dir.iterdir())
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "learning_rate = inf" in err and "caption_dropout = nan" in err and "finite" in err
    assert sorted(p.name for p in home.runs_dir.iterdir()) == before  # no run folder was created


# -- ints at their bounds -----------------------------------------------------------------------------
BOUNDS = [(name, lo, hi, step) for name, (lo, hi, step, _why) in INT_LIMITS.items()]


@pytest.mark.parametrize(("field", "lo", "hi", "step"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_each_int_field_passes_just_inside_and_is_refused_just_outside(home, field, lo, hi, step):
    for inside in (lo, hi):
        assert named(problems_of(home, **{field: inside}), field) == [], (field, inside)
    for outside in (lo - step, hi + step):
        texts = named(problems_of(home, **{field: outside}), field)
        assert texts and texts[0].startswith(f"{field} = {outside}") and f"{lo}" in texts[0] and f"{hi}" in texts[0]
    if step > 1:
        assert named(problems_of(home, **{field: lo + 1}), field), "a side that is not a multiple of 16"


def test_seed_limit_is_what_numpy_and_torch_accept():
    import numpy as np
    import torch

    lo, hi, _step, _why = INT_LIMITS["seed"]
    np.random.seed(hi)
    torch.Generator().manual_seed(hi + 1000)  # the trainer seeds its noise with seed + 1000 * rank
    with pytest.raises(ValueError):
        np.random.seed(hi + 1)  # the first value refused is the first one numpy cannot take


# -- strings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trigger_word", "sks\x1b[2J"),
        ("sample_prompt", "a cat\x00"),
        ("sample_prompts", ["fine", "two\nlines"]),
        ("output_name", "lora\n"),
        ("dataset_path", "demo-shapes\r"),
    ],
)
def test_control_characters_are_refused(home, field, value):
    texts = named(problems_of(home, **{field: value}), field)
    assert texts and "control characters" in " ".join(texts)


def test_output_name_is_checked_as_the_whole_string(home):
    # check_slug's regex ends in `$`, which also matches before a final newline: the whole string counts here.
    texts = named(problems_of(home, output_name="good\n"), "output_name")
    assert any("nothing else" in t or "control" in t for t in texts)
    assert named(problems_of(home, output_name="good-name_2"), "output_name") == []


# -- output locations ---------------------------------------------------------------------------------
def test_output_dir_outside_the_home_is_refused_inside_is_fine(home, tmp_path):
    outside = tmp_path / "elsewhere"
    (text,) = named(problems_of(home, output_dir=str(outside)), "output_dir")
    assert str(outside) in text and "allowed_output_roots" in text and "settings.toml" in text
    (text,) = named(problems_of(home, output_dir="../../escape"), "output_dir")
    assert "outside the allowed output roots" in text
    assert named(problems_of(home, output_dir="models/custom"), "output_dir") == []
    link = home.home / "sneaky"
    link.symlink_to(outside, target_is_directory=True)
    try:  # a symlink inside the home that leads out of it is outside
        assert named(problems_of(home, output_dir="sneaky"), "output_dir")
    finally:
        link.unlink()


def test_settings_toml_allows_another_output_root(tmp_path, tiny_model_dir):
    settings = make_home(tmp_path / "home", tiny_model_dir)
    shared = tmp_path / "shared-loras"
    settings.settings_path.write_text(f"[paths]\nallowed_output_roots = [{json.dumps(str(shared))}]\n")
    resolved = validate_config(build_config(fast_config(output_dir=str(shared / "team"))), settings, CPU)
    assert resolved.output_path == shared / "team" / "test_lora.safetensors"
    assert not shared.exists()  # validation creates nothing
    assert named(problems_of(settings, output_dir=str(tmp_path / "other")), "output_dir")

    settings.settings_path.write_text('[paths]\nallowed_output_roots = ["relative/dir"]\n')
    (text,) = named(problems_of(settings, output_dir=str(tmp_path / "other")), "output_dir")
    assert "settings.toml" in text and "allowed_output_roots" in text and "absolute" in text


# -- memory ---------------------------------------------------------------------------------------------
def test_a_config_that_cannot_fit_warns_with_the_estimate_and_the_hosts_memory(home):
    import psutil

    from zimage.training.memory import estimate_memory

    big = build_config(fast_config(resolution=4096, min_image_side=64, batch_size=256, gradient_checkpointing=False))
    need = estimate_memory(big).total_gib
    ram = psutil.virtual_memory().total / 2**30
    if need <= ram:
        pytest.skip(f"this host has {ram:.0f} GiB of RAM, more than the {need:.0f} GiB the big config needs")
    resolved = with_memory_warning(validate_config(big, home, CPU))  # valid, but will not fit: a warning
    (warning,) = [w for w in resolved.warnings if w.startswith("memory:")]
    assert f"{need:.1f} GiB" in warning and f"{ram:.1f} GiB of RAM" in warning and "Try:" in warning
    small = with_memory_warning(validate_config(build_config(fast_config()), home, CPU))
    assert not [w for w in small.warnings if w.startswith("memory:")]


def test_queue_add_refuses_an_infinite_rate_before_creating_a_run(home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZIMAGE_HOME", str(home.home))
    cfg = tmp_path / "q.yaml"
    cfg.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fast_config().items()) + "learning_rate: .inf\n")
    before = sorted(os.listdir(home.runs_dir))
    assert main(["queue", "add", str(cfg)]) == 2
    assert "learning_rate = inf" in capsys.readouterr().err
    assert sorted(os.listdir(home.runs_dir)) == before
