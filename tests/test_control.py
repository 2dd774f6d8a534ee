"""Control while running, seen only through the run folder: save now, sample now, pause/resume, SIGINT,
out-of-memory advice; no request lost between writers, each acted on once, none again after a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch
from shared_cache import home_with_shared_cache
from train_support import fast_config

from zimage.config import build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training import checkpoints
from zimage.training.runner import out_of_memory_message, run_training
from zimage.training.trainer import LoraTrainer


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return home_with_shared_cache(tmp_path_factory, tiny_model_dir, "control")


def test_save_now_sample_now_pause_resume_and_sigint(home, tmp_path):
    config = fast_config(num_steps=50, sample_every_n_steps=0, save_every_n_steps=0, sample_resolution=64,
                         sample_prompt="a blue square", output_name="controlled")  # fmt: skip
    resolved = validate_config(build_config(config), home)
    run = RunFolder(tmp_path / "run")
    run.write_config(resolved.config.to_dict())
    seen: dict[str, object] = {}

    def resume_when_paused():
        deadline = time.time() + 60
        while time.time() < deadline and run.read_status().get("state") != "paused":
            time.sleep(0.05)
        seen["paused"] = run.read_status().get("state"), run.read_status().get("step")
        time.sleep(0.6)  # stays paused: no step is trained meanwhile
        seen["still"] = run.read_status().get("step")
        run.send_control("resume")

    def on_step(record):
        step = record["step"]
        if step == 2:
            run.send_control("save_now")
        elif step == 3:
            seen["after_save"] = [p.name for p in run.checkpoints_dir.iterdir()]
            run.send_control("sample_now")
        elif step == 4:
            seen["samples"] = run.samples_path.read_text() if run.samples_path.exists() else ""
            run.send_control("pause")
            threading.Thread(target=resume_when_paused, daemon=True).start()
        elif step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # like Ctrl-C in the terminal: a graceful stop

    assert run_training(resolved, home, run.path, on_step=on_step) == 0
    assert seen["after_save"] == ["step-000002"]  # acted on before the next step
    sample = json.loads(seen["samples"].splitlines()[0])
    assert sample["step"] == 3 and sample["reason"] == "requested" and sample["prompt"] == "a blue square"
    assert (run.path / sample["path"]).is_file()
    assert seen["paused"] == ("paused", 4) and seen["still"] == 4
    status = run.read_status()
    assert status["state"] == "stopped" and status["step"] == 5
    assert [c.step for c in checkpoints.list_checkpoints(run.checkpoints_dir)] == [2, 5]  # save-now + stop
    log = run.log_path.read_text()
    assert "Paused at step 4" in log and "Resumed at step 4" in log and "received SIGINT" in log
    assert "Checkpoint at step 2 (requested)" in log and "Checkpoint at step 5 (stop)" in log


def test_out_of_memory_fails_with_the_settings_that_lower_memory(home, tmp_path, monkeypatch):
    resolved = validate_config(build_config(fast_config(num_steps=3, output_name="oom")), home)
    run = RunFolder(tmp_path / "run")

    def out_of_memory(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(LoraTrainer, "train_step", out_of_memory)  # no GPU here to run out of
    assert run_training(resolved, home, run.path) == 1
    status = run.read_status()
    assert status["state"] == "failed" and status["error"].startswith("Out of memory (CUDA out of memory.")
    assert "gradient_checkpointing" in status["error"] and "OutOfMemoryError" in status["traceback"]
    assert not resolved.output_path.exists()


def test_out_of_memory_advice_for_the_real_model_names_settings_and_savings():
    message = out_of_memory_message(build_config(fast_config(model_path="z-image-turbo", resolution=1024)), "OOM")
    lines = message.splitlines()
    assert lines[0] == "Out of memory (OOM)" and lines[1].startswith("Settings that lower memory")
    assert any("gradient_checkpointing" in x for x in lines) and any("quantize" in x for x in lines)
    assert all("GiB)" in x for x in lines[2:])


def test_two_writers_at_once_lose_no_request_and_the_worker_acts_on_each_once(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.update_status(state="running")
    go = tmp_path / "go"
    writer = (
        "import pathlib, sys, time\nfrom zimage.runfolder import RunFolder\n"
        "run, go = RunFolder(sys.argv[1]), pathlib.Path(sys.argv[2])\n"
        "while not go.exists():\n    time.sleep(0.001)\n"  # both start writing at the same moment
        "for _ in range(120):\n    run.send_control('save_now', user=sys.argv[3])\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(run.path), str(go), who]) for who in ("ann", "bob")]
    polls = []
    try:
        go.touch()
        while any(p.poll() is None for p in procs):  # the worker polls while they write
            polls.append(run.poll_control().save_now)
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    polls.append(run.poll_control().save_now)
    requests = run.read_control()
    assert Counter(r["user"] for r in requests) == {"ann": 120, "bob": 120}  # none lost
    ids = [r["id"] for r in requests]
    done = run.read_status()["control_done"]
    assert len(set(ids)) == 240 and sorted(done) == sorted(ids)  # each acted on, and recorded, once
    assert any(polls) and not run.poll_control().save_now


def test_a_resumed_run_does_not_repeat_the_requests_its_predecessor_handled(home, tmp_path):
    config = fast_config(num_steps=4, output_name="resumed-once")
    resolved = validate_config(build_config(config), home)
    run = RunFolder(tmp_path / "run")
    run.write_config(resolved.config.to_dict())

    def first(record):
        if record["step"] == 1:
            run.send_control("save_now")
        elif record["step"] == 2:
            run.send_control("stop")

    assert run_training(resolved, home, run.path, on_step=first) == 0
    assert run.read_status()["state"] == "stopped" and run.read_status()["step"] == 2
    assert sorted(run.handled_control()) == sorted(r["id"] for r in run.read_control())
    # The same process entry the queue's resume reaches: the old stop and save-now are not acted on again.
    resolved = validate_config(build_config(resolved.config.to_dict()).replace(overwrite=True), home)
    assert run_training(resolved, home, run.path, resume=True) == 0
    status = run.read_status()
    assert status["state"] == "completed" and status["step"] == 4 and status["resumed_from_step"] == 2
    assert [c.step for c in checkpoints.list_checkpoints(run.checkpoints_dir)] == [1, 2]  # no second save-now
    assert run.log_path.read_text().count("Stopping: stop requested from the app") == 1
