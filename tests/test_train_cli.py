"""`zimage train` and the run folder: exit codes, status, queue hand-over, stop, SIGTERM, NaN, heartbeat."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from train_support import fast_config

from zimage.cli import main
from zimage.config import build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training.reporting import Reporter
from zimage.training.runner import run_training

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One latent/text cache for the module: the tests here are about the run folder, not about encoding."""
    return tmp_path_factory.mktemp("shared-cache")


@pytest.fixture()
def home(zhome_demo, shared_cache):
    zhome_demo.cache_dir.symlink_to(shared_cache, target_is_directory=True)
    return zhome_demo


def _lora_steps(path: Path) -> int:
    with safe_open(str(path), framework="pt") as fh:
        return int(fh.metadata()["steps"])


def test_cli_trains_from_a_yaml_file_into_a_new_run_folder(home, tmp_path, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(yaml.safe_dump(fast_config(num_steps=3)))
    assert main(["train", str(cfg), "--set", "lora_rank=2", "--set", "output_name=from-cli"]) == 0
    out = capsys.readouterr().out
    runs = list(home.runs_dir.iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-from-cli") and f"run folder: {runs[0]}" in out
    assert re.fullmatch(r"\d{8}-\d{6}-from-cli", runs[0].name)
    run = RunFolder(runs[0])
    config = run.read_config()
    assert config["lora_rank"] == 2 and config["num_steps"] == 3 and config["trigger_word"] == "zshape"
    assert config["config_version"] == 1 and config["sample_steps"] == 4  # defaults filled from the model
    status = run.read_status()
    assert status["state"] == "completed" and status["step"] == 3 and status["total_steps"] == 3
    assert status["kind"] == "train" and status["pid"] == os.getpid() and status["host"]
    assert status["ended"] >= status["started"] and status["error"] is None
    lora = home.loras_dir / "from-cli.safetensors"
    assert status["output_path"] == str(lora) and _lora_steps(lora) == 3
    assert len(run.metrics_path.read_text().splitlines()) == 3
    assert "Run completed at step 3" in run.log_path.read_text()
    assert f"completed: {lora}" in out


def test_invalid_config_exits_2_lists_every_problem_and_leaves_nothing(home, tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps(fast_config(lora_rank=0, learning_rate=-1, resolution=300)))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert (
        "3 problem(s)" in err and "lora_rank = 0" in err and "learning_rate = -1" in err and "resolution = 300" in err
    )
    assert list(home.runs_dir.iterdir()) == []
    assert list(home.loras_dir.iterdir()) == []


def test_queue_hand_over_trains_in_the_given_folder_and_keeps_its_config(home, capsys):
    run = RunFolder(home.runs_dir / "20261129-000000-queued")
    run.write_config(fast_config(num_steps=2, output_name="queued"))
    run.update_status(state="queued")
    before = run.config_path.read_bytes()
    assert main(["train", "--run-dir", str(run.path)]) == 0
    assert run.config_path.read_bytes() == before  # never changed after launch
    status = run.read_status()
    assert status["state"] == "completed" and status["pid"] == os.getpid() and status["kind"] == "train"
    assert (home.loras_dir / "queued.safetensors").exists()
    assert f"run folder: {run.path}" in capsys.readouterr().out


def test_queue_hand_over_with_an_invalid_config_marks_the_run_failed(home):
    run = RunFolder(home.runs_dir / "20261129-000001-bad")
    run.write_config(fast_config(optimizer="sgd9000", output_name="bad"))
    run.update_status(state="queued")
    assert main(["train", "--run-dir", str(run.path)]) == 2
    status = run.read_status()
    assert status["state"] == "failed" and "optimizer = 'sgd9000'" in status["error"]
    assert not (home.loras_dir / "bad.safetensors").exists()


def test_preset_and_set_without_a_file(home):
    args = ["train", "--preset", "quick_test"] + [
        f"--set={k}={v}" for k, v in fast_config(num_steps=2, output_name="preset-run").items() if k != "resolution"
    ]
    assert main([*args, "--set", "resolution=256"]) == 0
    (run_dir,) = home.runs_dir.iterdir()
    config = RunFolder(run_dir).read_config()
    assert config["lora_rank"] == 4 and config["lr_scheduler"] == "constant" and config["resolution"] == 256


def test_stop_request_saves_the_lora_and_ends_stopped(home, tmp_path):
    resolved = validate_config(build_config(fast_config(num_steps=50)), home)
    run = RunFolder(tmp_path / "run")
    run.write_config(resolved.config.to_dict())

    def on_step(record):
        if record["step"] == 3:
            run.send_control("stop")

    assert run_training(resolved, home, run.path, on_step=on_step) == 0
    status = run.read_status()
    assert status["state"] == "stopped" and status["step"] == 3
    assert _lora_steps(resolved.output_path) == 3
    assert "Stopping: stop requested from the app" in run.log_path.read_text()


def test_pause_then_resume(home, tmp_path):
    resolved = validate_config(build_config(fast_config(num_steps=4)), home)
    run = RunFolder(tmp_path / "run")
    seen: list[str] = []

    def resume_later():
        deadline = time.time() + 20
        while time.time() < deadline and run.read_status().get("state") != "paused":
            time.sleep(0.05)
        seen.append(run.read_status().get("state"))
        run.send_control("resume")

    def on_step(record):
        if record["step"] == 2:
            run.send_control("pause")
            threading.Thread(target=resume_later, daemon=True).start()

    assert run_training(resolved, home, run.path, on_step=on_step) == 0
    assert seen == ["paused"] and run.read_status()["state"] == "completed"
    log = run.log_path.read_text()
    assert "Paused at step 2" in log and "Resumed at step 2" in log


def test_nan_loss_fails_the_run_with_advice_and_saves_nothing(home, tmp_path):
    config = fast_config(num_steps=30, learning_rate=1e30, max_grad_norm=0.0)
    resolved = validate_config(build_config(config), home)
    run = RunFolder(tmp_path / "run")
    assert run_training(resolved, home, run.path) == 1
    status = run.read_status()
    assert status["state"] == "failed" and "training diverged" in status["error"]
    assert "at step" in status["error"] and "learning_rate" in status["error"]
    assert "TrainingDiverged" in status["traceback"]
    assert not resolved.output_path.exists()


def test_sigterm_is_a_graceful_stop(home, tmp_path):
    cfg = tmp_path / "long.json"
    cfg.write_text(json.dumps(fast_config(num_steps=100000, output_name="sigterm")))
    run_dir = tmp_path / "run"
    env = dict(os.environ, ZIMAGE_HOME=str(home.home))
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage.cli", "train", str(cfg), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=PROJECT,
    )  # fmt: skip
    run = RunFolder(run_dir)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not run.metrics_path.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    status = run.read_status()
    assert status["state"] == "stopped" and 0 < status["step"] < 100000
    assert _lora_steps(home.loras_dir / "sigterm.safetensors") == status["step"]
    assert "received SIGTERM" in run.log_path.read_text()


def test_heartbeat_keeps_status_fresh_during_long_phases(tmp_path):
    run = RunFolder(tmp_path / "run")
    reporter = Reporter(run)
    reporter.status(state="starting")
    first = run.read_status()["heartbeat"]
    reporter.progress(step=5, phase="caching latents and text")
    reporter.start_heartbeat(interval=0.05)
    try:
        time.sleep(0.4)
    finally:
        reporter.stop_heartbeat()
    status = run.read_status()
    assert status["heartbeat"] > first and status["step"] == 5 and status["phase"] == "caching latents and text"
    assert status["state"] == "starting"


@pytest.mark.parametrize("argv", [["train"], ["train", "--run-dir", "/nonexistent/run"]])
def test_missing_inputs_are_explained(home, capsys, argv):
    assert main(argv) == 2
    assert "config.json" in capsys.readouterr().err
