"""A queued job over 2 GPUs runs as 2 torchrun ranks (gloo on the CPU): one writer, stop reaches both,
a dead rank fails the job with its error, and no process is left behind.

The host offers two slots through settings.toml (`[scheduler] gpus = "0,1"`; on this CPU host the ids only
count slots: CUDA_VISIBLE_DEVICES=0,1 finds no CUDA and the ranks run on the CPU). The real scheduler
starts the jobs; the ranks are real processes found with psutil. Each torchrun start costs ~10 s here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from shared_cache import home_with_shared_cache
from train_support import fast_config

from zimage.jobs.launcher import job_processes, kill_job
from zimage.jobs.scheduler import Scheduler
from zimage.run_records import read_launch
from zimage.runfolder import RunFolder

pytestmark = pytest.mark.slow
PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_slot_host(tmp_path_factory, tiny_model_dir):
    """A home with 2 GPU slots and its scheduler running (it launches the queued jobs)."""
    home = home_with_shared_cache(tmp_path_factory, tiny_model_dir, "torchrun-jobs")
    (home.home / "settings.toml").write_text('[scheduler]\ngpus = "0,1"\n')
    saved = {k: os.environ.get(k) for k in ("ZIMAGE_HOME", "ZIMAGE_GPUS", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    os.environ.update(ZIMAGE_HOME=str(home.home), OMP_NUM_THREADS="1")  # the workers inherit this environment
    os.environ.pop("ZIMAGE_GPUS", None)
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    sched = Scheduler(home, tick=0.2, rescan=1.0, watch=False).start()
    try:
        assert sched.slots.gpu_ids == ("0", "1")
        yield home
    finally:
        sched.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def queue_add(home, tmp_path: Path, name: str, **config) -> RunFolder:
    """`zimage queue add CONFIG --gpus 2`, as a person types it."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(fast_config(output_name=name, **config)))
    proc = subprocess.run([sys.executable, "-m", "zimage.cli", "queue", "add", str(path), "--gpus", "2"],
                          capture_output=True, text=True, timeout=120, cwd=PROJECT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.split()[1]
    return RunFolder(home.runs_dir / run_id)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def ranks_of(run: RunFolder) -> tuple[psutil.Process, dict[int, psutil.Process]]:
    """The job's agent process (launch.json) and its ranks by RANK, once both ranks are training."""
    run.read_status()
    rec = read_launch(run.path / "launch.json")
    agent = psutil.Process(rec.pid)
    ranks = {}
    for child in agent.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None:
            ranks[int(rank)] = child
    return agent, ranks


def training(run: RunFolder, steps: int = 2) -> bool:
    status = run.read_status()
    return status.get("state") == "running" and (status.get("step") or 0) >= steps


def final(run: RunFolder) -> str | None:
    state = run.read_status().get("state")
    return state if state in ("completed", "stopped", "failed", "lost") else None


def test_queue_add_gpus_2_runs_two_ranks_one_writer_and_stop_reaches_both(two_slot_host, tmp_path):
    run = queue_add(two_slot_host, tmp_path, "ddp-stop", num_steps=400)
    wait_for(lambda: training(run), 180, "both ranks training")
    rec = read_launch(run.path / "launch.json")
    assert rec.cmd[1:4] == ["-m", "zimage.jobs.ranks", "--nproc-per-node"] and rec.cmd[4] == "2"
    assert rec.gpu_ids == "0,1" and rec.model_extra["ranks"] == 2
    agent, ranks = ranks_of(run)
    assert sorted(ranks) == [0, 1]
    for rank, proc in ranks.items():
        env = proc.environ()
        assert (env["WORLD_SIZE"], env["CUDA_VISIBLE_DEVICES"], env["LOCAL_RANK"]) == ("2", "0,1", str(rank))
    status = run.read_status()
    assert status["pid"] == ranks[0].pid  # rank 0 is the one writer of status.json
    assert status["cuda_visible_devices"] == "0,1"
    everyone = [agent, *ranks.values()]

    run.send_control("stop", user="ann")
    assert wait_for(lambda: final(run), 120, "the stop") == "stopped"
    status = run.read_status()
    assert 2 <= status["step"] < 400
    # Both ranks left the loop at the same step: the weights were compared across them at the end.
    log = run.log_path.read_text()
    assert "Data-parallel check: the trained weights are identical on all 2 processes" in log
    assert log.count("Run stopped at step") == 1  # one writer
    psutil.wait_procs(everyone, timeout=60)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    steps = [json.loads(line)["step"] for line in run.metrics_path.read_text().splitlines()]
    assert steps == list(range(1, status["step"] + 1))  # metrics written once per step


def test_a_killed_rank_fails_the_job_with_its_error_and_leaves_no_process(two_slot_host, tmp_path):
    run = queue_add(two_slot_host, tmp_path, "ddp-kill", num_steps=400)
    wait_for(lambda: training(run), 180, "both ranks training")
    agent, ranks = ranks_of(run)
    everyone = [agent, *ranks.values()]
    ranks[1].send_signal(signal.SIGKILL)

    # Rank 0 may record its own error first (gloo: connection closed by peer); the agent has the last word.
    gone, alive = psutil.wait_procs(everyone, timeout=90)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    status = run.read_status()
    assert status["state"] == "failed"
    assert status["error"].startswith(f"rank 1 of 2 was killed by SIGKILL (PID {ranks[1].pid})"), status["error"]
    assert "Failed: rank 1 of 2 was killed by SIGKILL" in run.log_path.read_text()


def test_killing_the_job_ends_every_rank(two_slot_host, tmp_path):
    """kill_job: SIGTERM to the agent reaches both ranks (rank 0 saves and ends stopped); then the tree
    is gone. SIGKILL to the agent alone: the ranks notice and end too (none is left orphaned)."""
    run = queue_add(two_slot_host, tmp_path, "ddp-term", num_steps=400)
    wait_for(lambda: training(run), 180, "both ranks training")
    agent, ranks = ranks_of(run)
    assert {p.pid for p in job_processes(agent.pid, agent.create_time())} >= {agent.pid, ranks[0].pid, ranks[1].pid}
    killed = kill_job(agent.pid, agent.create_time(), grace=90)
    assert killed == []  # all ended on the SIGTERM, none needed SIGKILL
    assert wait_for(lambda: final(run), 30, "the final state") == "stopped"
    assert job_processes(agent.pid, agent.create_time()) == []

    orphaned = queue_add(two_slot_host, tmp_path, "ddp-orphan", num_steps=400)
    wait_for(lambda: training(orphaned), 180, "both ranks training")
    agent, ranks = ranks_of(orphaned)
    agent.send_signal(signal.SIGKILL)
    gone, alive = psutil.wait_procs(list(ranks.values()), timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
    assert wait_for(lambda: final(orphaned), 30, "the final state") == "failed"
    # Which rank reports first is a race: one sees its agent gone, or rank 0 sees its peer leave (gloo says
    # "Connection closed by peer" or "Read error ... Connection reset by peer", as the socket went)
    error = orphaned.read_status()["error"]
    peer_gone = "Connection closed by peer" in error or "Connection reset by peer" in error
    assert "the torchrun agent" in error or peer_gone, error
