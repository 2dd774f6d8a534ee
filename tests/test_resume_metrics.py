"""A run killed right after a checkpoint and resumed from it keeps every step's metrics: the lines of the
steps a checkpoint holds are on disk before the checkpoint is (zimage.job.Job.flush_metrics), so after two
SIGKILLs and resumes every step appears exactly once, in metrics.jsonl (under DESIGN.md's rule that a later
line for an earlier step voids the lines after it) and in the registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shared_cache import home_with_shared_cache
from train_support import fast_config

from zimage.registry.db import Registry
from zimage.registry.ingest import Ingester
from zimage.runfolder import RunFolder

PROJECT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 24, 4


def _effective_steps(lines: list[str]) -> list[int]:
    """The steps metrics.jsonl stands for: a line for step s voids the kept lines at s and after."""
    kept: list[int] = []
    for line in lines:
        step = json.loads(line)["step"]
        while kept and kept[-1] >= step:
            kept.pop()
        kept.append(step)
    return kept


def _checkpoints(run: RunFolder) -> set[str]:
    try:
        return {p.name for p in run.checkpoints_dir.iterdir() if p.name.startswith("step-")}
    except FileNotFoundError:
        return set()


def _train_until_a_new_checkpoint_then_kill(argv: list[str], run: RunFolder, env: dict) -> str:
    """Start `zimage ARGV`, SIGKILL it the moment a checkpoint it wrote appears; returns that checkpoint."""
    before = _checkpoints(run)
    proc = subprocess.Popen([sys.executable, "-m", "zimage.cli", *argv], env=env, cwd=PROJECT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (new := _checkpoints(run) - before):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)  # no flush, no final state: what a crash or an OOM kill leaves
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return max(new)


@pytest.mark.slow
def test_every_step_survives_two_kills_right_after_a_checkpoint(tmp_path_factory, tiny_model_dir, tmp_path):
    home = home_with_shared_cache(tmp_path_factory, tiny_model_dir, "resume-metrics")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(fast_config(num_steps=STEPS, save_every_n_steps=EVERY, output_name="killed_twice")))
    run = RunFolder(tmp_path / "run")
    env = dict(os.environ, ZIMAGE_HOME=str(home.home), OMP_NUM_THREADS="1")  # see train_support.one_torch_thread
    killed_at = [_train_until_a_new_checkpoint_then_kill(["train", str(cfg), "--run-dir", str(run.path)], run, env)]
    killed_at.append(_train_until_a_new_checkpoint_then_kill(["train", "--resume", str(run.path)], run, env))
    assert killed_at[0] < killed_at[1] < f"step-{STEPS:06d}", killed_at
    done = subprocess.run([sys.executable, "-m", "zimage.cli", "train", "--resume", str(run.path)], env=env,
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert run.read_status()["state"] == "completed"

    lines = run.metrics_path.read_text().splitlines()
    assert set(range(1, STEPS + 1)) <= {json.loads(line)["step"] for line in lines}  # nothing lost for good
    assert _effective_steps(lines) == list(range(1, STEPS + 1))  # and each step once

    (home.runs_dir / "killed").symlink_to(run.path, target_is_directory=True)
    reg = Registry(home.db_path)
    try:
        Ingester(reg, home).ingest_run("killed")
        steps = [s for (s,) in reg.fetch("SELECT step FROM metrics WHERE run_id = 'killed' ORDER BY line")]
        summary = reg.fetch("SELECT metrics_rows, last_metric_step FROM runs WHERE run_id = 'killed'")[0]
    finally:
        reg.close()
    assert steps == list(range(1, STEPS + 1)) and summary == (STEPS, STEPS)
