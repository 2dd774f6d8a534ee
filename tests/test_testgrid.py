"""Test-grid jobs: config checks, real rendering with diffusers' LoRA loading, stop, and the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zimage.runfolder import RunFolder
from zimage.testgrid import TestGridError, check_config, run_grid
from zimage.training import lora_io

ROOT = Path(__file__).resolve().parents[1]
MODULES = [f"layers.{i}.attention.{m}" for i in range(2) for m in ("to_q", "to_k", "to_v", "to_out.0")]


def make_lora(path: Path, seed: int) -> Path:
    """A strong random LoRA on the tiny transformer's attention (dim 32), in the trainer's file format."""
    g = torch.Generator().manual_seed(seed)
    modules = {m: lora_io.LoraModule(down=torch.randn(4, 32, generator=g), up=torch.randn(32, 4, generator=g),
                                     alpha=4.0) for m in MODULES}  # fmt: skip
    return lora_io.save_lora(path, modules, dtype=torch.float32)


def grid_config(settings, loras, **over):
    cfg = {"model_path": "tiny-zimage", "prompt": "zshape, a red circle", "seed": 5, "width": 64, "height": 64,
           "steps": 2, "strengths": [0.0, 1.0], "loras": [{"label": p.stem, "path": str(p)} for p in loras]}  # fmt: skip
    cfg.update(over)
    return cfg


def test_check_config_names_every_bad_field(zhome_demo, tmp_path):
    good = make_lora(tmp_path / "a.safetensors", 0)
    (tmp_path / "notes.safetensors").write_bytes(b"garbage")
    (tmp_path / "a.ckpt").write_bytes(b"pickle")
    raw = grid_config(zhome_demo, [good], prompt=" ", width=100, steps=0, strengths=[0, 9], colour="red",
                      model_path="nope")  # fmt: skip
    raw["loras"] += [{"label": "bad", "path": str(tmp_path / "notes.safetensors")},
                     {"label": "pickle", "path": str(tmp_path / "a.ckpt")}, {"label": "again", "path": str(good)}]  # fmt: skip
    with pytest.raises(TestGridError) as err:
        check_config(raw, zhome_demo)
    text = "\n".join(err.value.problems)
    for expected in ("colour: unknown setting", "prompt: must not be empty", "width: 100 must be a multiple of 16",
                     "steps: 0 must be from 1", "strengths: each must be from -4 to 4",
                     "(bad)", "not a readable safetensors", "(pickle)", ".safetensors file (pickles",
                     "(again)", "chosen twice", "model_path: Unknown model 'nope'"):  # fmt: skip
        assert expected in text, expected
    cfg = check_config(grid_config(zhome_demo, [good], steps=None, cfg=None), zhome_demo)
    assert (cfg.steps, cfg.cfg, cfg.cells) == (4, 2.0, 2)  # the tiny model's sampling defaults
    with pytest.raises(TestGridError, match="more than 64 images"):
        check_config(grid_config(zhome_demo, [good], strengths=[0.1 * i for i in range(40)] * 2), zhome_demo)


def test_grid_renders_each_lora_at_each_strength(zhome_demo, tmp_path):
    a, b = make_lora(tmp_path / "lora-a.safetensors", 1), make_lora(tmp_path / "lora-b.safetensors", 2)
    run = RunFolder(zhome_demo.runs_dir / "grid-1")
    run.write_config(grid_config(zhome_demo, [a, b], strengths=[0.0, 1.0, 2.0]))
    assert run_grid(run.path, zhome_demo) == 0
    status = run.read_status()
    assert (status["state"], status["step"], status["total_steps"], status["grid_path"]) == (
        "completed",
        6,
        6,
        "grid.png",
    )
    lines = [json.loads(x) for x in run.samples_path.read_text().splitlines()]
    assert [(r["row"], r["col"], r["strength"], r["lora"]) for r in lines[:3]] == [
        (0, 0, 0.0, "lora-a"), (0, 1, 1.0, "lora-a"), (0, 2, 2.0, "lora-a"),
    ]  # fmt: skip
    assert all(r["seed"] == 5 and r["prompt"] == "zshape, a red circle" for r in lines)
    pixels = {(r["row"], r["col"]): np.asarray(Image.open(run.path / r["path"])) for r in lines}
    assert pixels[(0, 0)].shape == (64, 64, 3)
    assert np.array_equal(pixels[(0, 0)], pixels[(1, 0)])  # strength 0 is the base model for both LoRAs
    assert not np.array_equal(pixels[(0, 0)], pixels[(0, 1)])  # the LoRA changes the image
    assert not np.array_equal(pixels[(0, 1)], pixels[(1, 1)])  # and each LoRA is applied on its own
    with Image.open(run.path / "grid.png") as grid:
        assert grid.width > 3 * 64 and grid.height > 2 * 64


def test_stop_request_and_the_command(zhome_demo, tmp_path):
    a = make_lora(tmp_path / "a.safetensors", 3)
    run = RunFolder(zhome_demo.runs_dir / "grid-stop")
    run.write_config(grid_config(zhome_demo, [a]))
    run.send_control("stop")  # asked before the first image: nothing is rendered
    assert run_grid(run.path, zhome_demo) == 0
    assert run.read_status()["state"] == "stopped" and not run.samples_path.exists()

    bad = RunFolder(zhome_demo.runs_dir / "grid-bad")
    bad.write_config(grid_config(zhome_demo, [a], prompt=""))
    env = dict(os.environ, ZIMAGE_HOME=str(zhome_demo.home))
    proc = subprocess.run([sys.executable, "-m", "zimage.cli", "testgrid", "--run-dir", str(bad.path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "prompt: must not be empty" in proc.stderr
    status = bad.read_status()
    assert status["state"] == "failed" and "prompt: must not be empty" in status["error"] and status["pid"]
    missing = subprocess.run([sys.executable, "-m", "zimage.cli", "testgrid", "--run-dir", str(tmp_path)],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "no config.json" in missing.stderr
