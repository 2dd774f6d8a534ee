"""Data parallel on the CPU: `torchrun --nproc_per_node 2` (gloo) runs the same `zimage train` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from shared_cache import home_with_shared_cache
from train_support import fast_config

from zimage.runfolder import RunFolder
from zimage.training import checkpoints

PROJECT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model_dir):
    home = home_with_shared_cache(tmp_path_factory, tiny_model_dir, "ddp")
    folder = tmp_path_factory.mktemp("ddp")
    cfg = folder / "ddp.json"
    cfg.write_text(json.dumps(fast_config(num_steps=4, save_every_n_steps=2, sample_every_n_steps=4,
                                          sample_resolution=64, output_name="ddp-lora")))  # fmt: skip
    run_dir = home.runs_dir / "ddp-run"
    env = dict(os.environ, ZIMAGE_HOME=str(home.home), OMP_NUM_THREADS="1")
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "zimage.cli", "train", str(cfg),
           "--run-dir", str(run_dir)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return home, RunFolder(run_dir), proc


def test_one_run_folder_one_lora_and_metrics_written_once(two_process_run):
    home, run, proc = two_process_run
    assert [p.name for p in home.runs_dir.iterdir()] == ["ddp-run"]
    assert sorted(p.name for p in home.loras_dir.iterdir()) == ["ddp-lora.safetensors"]
    status = run.read_status()
    assert status["state"] == "completed" and status["step"] == 4
    steps = [json.loads(line)["step"] for line in run.metrics_path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    samples = [json.loads(line)["step"] for line in run.samples_path.read_text().splitlines()]
    assert samples == [0, 4]
    assert [c.step for c in checkpoints.list_checkpoints(run.checkpoints_dir)] == [2, 4]
    assert proc.stdout.count("run folder:") == 1


def test_lora_weights_are_identical_across_ranks_and_each_step_used_both(two_process_run):
    home, run, _ = two_process_run
    log = run.log_path.read_text()
    assert "Data-parallel check: the trained weights are identical on all 2 processes" in log
    assert "2 images/step" in log  # batch 1 per process x 2 processes
    with safe_open(str(home.loras_dir / "ddp-lora.safetensors"), framework="pt") as fh:
        assert fh.metadata()["steps"] == "4"
        up = fh.get_tensor("diffusion_model.layers.0.attention.to_q.lora_B.weight")
    assert up.abs().sum() > 0 and torch.isfinite(up).all()
