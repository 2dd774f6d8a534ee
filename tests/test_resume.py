"""Checkpoints and exact resume: stop at step k, resume, same losses; a kill mid-save loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from shared_cache import home_with_shared_cache
from train_support import fast_config, one_thread_per_module  # noqa: F401 - autouse

from zimage.cli import main
from zimage.config import build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training import checkpoints
from zimage.training.runner import run_training

PROJECT = Path(__file__).resolve().parents[1]
STEPS, STOP_AT = 8, 3
# Everything random in the loop is on: caption dropout, LoRA dropout, several micro-batches, a warmup.
CONFIG = dict(
    num_steps=STEPS, batch_size=2, gradient_accumulation=2, caption_dropout=0.3, lora_dropout=0.1,
    lr_scheduler="cosine", lr_warmup_steps=2, timestep_sampling="logit_normal", seed=7,
    save_every_n_steps=2, keep_last_n_checkpoints=2,
)  # fmt: skip


def _losses(run: RunFolder) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in run.metrics_path.read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]  # a resumed run may log a step again: the later line wins
    return out


def _lora(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return home_with_shared_cache(tmp_path_factory, tiny_model_dir, "resume")


@pytest.fixture(autouse=True)
def _home_env(home, monkeypatch):
    monkeypatch.setenv("ZIMAGE_HOME", str(home.home))  # for the `zimage train --resume` calls


@pytest.fixture(scope="module")
def uninterrupted(home, tmp_path_factory):
    resolved = validate_config(build_config(fast_config(**CONFIG, output_name="straight")), home)
    run = RunFolder(tmp_path_factory.mktemp("straight") / "run")
    run.write_config(resolved.config.to_dict())
    assert run_training(resolved, home, run.path) == 0
    return run, resolved


def test_periodic_checkpoints_keep_the_last_k(uninterrupted):
    run, _ = uninterrupted
    names = sorted(p.name for p in run.checkpoints_dir.iterdir())
    assert names == ["step-000006", "step-000008"]  # every 2 steps plus the end, last 2 kept
    ckpt = checkpoints.newest_checkpoint(run.checkpoints_dir)
    assert ckpt.step == STEPS and ckpt.lora_path.is_file()
    state = ckpt.load_state()  # weights_only=True
    assert state["step"] == STEPS and set(state) >= {"optimizer", "lr_scheduler", "sampler", "rng"}
    assert state["optimizer"]["state"] and state["lr_scheduler"]["last_epoch"] == STEPS
    progress = json.loads((ckpt.path / "progress.json").read_text())
    assert progress["complete"] is True and progress["step"] == STEPS
    with safe_open(str(ckpt.lora_path), framework="pt") as fh:
        assert fh.metadata()["steps"] == str(STEPS)
        assert any(k.startswith("diffusion_model.layers.0.attention.to_q.lora_A") for k in fh.keys())  # noqa: SIM118


def test_stop_then_resume_gives_the_same_losses_and_weights(home, uninterrupted, tmp_path, capsys):
    straight, straight_resolved = uninterrupted
    resolved = validate_config(build_config(fast_config(**CONFIG, output_name="stopped")), home)
    run = RunFolder(tmp_path / "run")
    run.write_config(resolved.config.to_dict())

    def on_step(record):
        if record["step"] == STOP_AT:
            run.send_control("stop")

    assert run_training(resolved, home, run.path, on_step=on_step) == 0
    status = run.read_status()
    assert status["state"] == "stopped" and status["step"] == STOP_AT
    assert checkpoints.newest_checkpoint(run.checkpoints_dir).step == STOP_AT
    assert resolved.output_path.exists()  # the LoRA so far is saved on stop too

    assert main(["train", "--resume", str(run.path)]) == 0
    assert f"resuming from step {STOP_AT}" in capsys.readouterr().out
    status = run.read_status()
    assert status["state"] == "completed" and status["step"] == STEPS and status["resumed_from_step"] == STOP_AT
    assert run.handled_control() == [r["id"] for r in run.read_control()]  # the stop counts as handled
    log = run.log_path.read_text()
    assert f"Resumed from step-{STOP_AT:06d}: continuing after step {STOP_AT}" in log

    want, got = _losses(straight), _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    a, b = _lora(straight_resolved.output_path), _lora(resolved.output_path)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-5
    with safe_open(str(resolved.output_path), framework="pt") as fh:
        assert fh.metadata()["steps"] == str(STEPS)


def test_resume_refuses_a_completed_run_and_a_folder_without_config(uninterrupted, tmp_path, capsys):
    run, _ = uninterrupted
    assert main(["train", "--resume", str(run.path)]) == 2
    assert "already completed" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from zimage import fsio

    marker, hold_at = Path(sys.argv[1]), int(sys.argv[2])
    original = fsio.fsync_tree

    def fsync_then_hold(folder):
        original(folder)
        if folder.name.startswith(f".tmp-step-{hold_at:06d}"):
            marker.write_text(str(folder))
            time.sleep(600)  # killed here: everything written, nothing renamed yet

    fsio.fsync_tree = fsync_then_hold  # what fsio.atomic_folder calls before renaming the checkpoint
    from zimage.cli import main
    sys.exit(main(sys.argv[3:]))
    """
)


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(home, uninterrupted, tmp_path):
    straight, _ = uninterrupted
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(fast_config(**CONFIG, output_name="killed")))
    run = RunFolder(tmp_path / "run")
    marker = tmp_path / "holding"
    env = dict(os.environ, ZIMAGE_HOME=str(home.home), OMP_NUM_THREADS="1")  # see train_support.one_torch_thread
    argv = [str(marker), "4", "train", str(cfg), "--run-dir", str(run.path)]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], env=env, cwd=PROJECT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the child never reached the checkpoint at step 4"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert Path(marker.read_text()).is_dir()  # the half-finished checkpoint is still there, hidden
    ckpt = checkpoints.newest_checkpoint(run.checkpoints_dir)
    assert ckpt.step == 2 and ckpt.load_state()["step"] == 2
    assert run.read_status()["state"] == "running"  # what a killed worker leaves (the app marks it lost)

    assert main(["train", "--resume", str(run.path)]) == 0
    assert run.read_status()["state"] == "completed" and run.read_status()["step"] == STEPS
    assert not list(run.checkpoints_dir.glob(".tmp-*"))  # the next save cleaned up the leftover
    assert "Resumed from step-000002" in run.log_path.read_text()
    want, got = _losses(straight), _losses(run)
    for step in range(3, STEPS + 1):  # steps 3 and 4 were trained twice; the resumed values match
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_the_queue_resume_path_continues_from_the_checkpoint(home, tmp_path):
    resolved = validate_config(build_config(fast_config(**{**CONFIG, "num_steps": 4}, output_name="queued")), home)
    run = RunFolder(tmp_path / "run")
    run.write_config(resolved.config.to_dict())

    def on_step(record):
        if record["step"] == 2:
            run.send_control("stop")

    assert run_training(resolved, home, run.path, on_step=on_step) == 0
    run.retire_control()
    run.update_status(state="queued", resume=True)  # what zimage.jobs.requeue leaves for the launcher
    assert main(["train", "--run-dir", str(run.path)]) == 0
    status = run.read_status()
    assert status["state"] == "completed" and status["step"] == 4 and status["resumed_from_step"] == 2
    assert sorted(_losses(run)) == [1, 2, 3, 4]


def test_a_checkpoint_that_does_not_fit_the_config_is_refused(home, uninterrupted):
    from zimage.training.checkpoints import CheckpointError
    from zimage.training.trainer import LoraTrainer

    run, _ = uninterrupted
    ckpt = checkpoints.newest_checkpoint(run.checkpoints_dir)
    for changed, message in (({"lora_rank": 8}, "does not fit this config"),
                             ({"lora_target_modules": ["attention.to_q"]}, "fit this config"),
                             ({"lora_target_blocks": ["layers", "noise_refiner"]}, "lacks")):  # fmt: skip
        resolved = validate_config(build_config(fast_config(**{**CONFIG, **changed}, output_name="misfit")), home)
        trainer = LoraTrainer(resolved, home, resume_from=ckpt)
        try:
            with pytest.raises(CheckpointError, match=message):
                trainer.setup()
        finally:
            trainer.cleanup()
