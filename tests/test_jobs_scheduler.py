"""The scheduler with real detached workers (the fake kind): FIFO, GPU slots, control, faults, restarts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from zimage import registry as R
from zimage.jobs import control, enqueue, registry_for
from zimage.jobs.launcher import process_alive
from zimage.jobs.owner import OwnerLock
from zimage.jobs.scheduler import Scheduler, ensure_scheduler, stop_all
from zimage.jobs.slots import SlotConfig
from zimage.runfolder import RunFolder, process_start_time, read_json

FAST = {"tick": 0.2, "rescan": 1.0}


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def status(settings, run_id):
    return RunFolder(settings.runs_dir / run_id).read_status()


def db_state(sched, run_id):
    rows = sched.registry.fetch("SELECT state FROM runs WHERE run_id = ?", [run_id])
    return rows[0][0] if rows else None


@pytest.fixture(autouse=True)
def kill_leftover_workers(zhome):
    """Workers are detached on purpose; a test must not leave its own running."""
    yield
    stop_all()
    for run_dir in zhome.runs_dir.iterdir():
        for rec in (read_json(run_dir / "status.json", {}), read_json(run_dir / "launch.json", {})):
            pid = (rec or {}).get("pid")
            if pid and process_alive(pid, rec.get("pid_start_time")):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture()
def start(zhome):
    started = []

    def _start(slots=SlotConfig(), **kw):
        sched = Scheduler(zhome, slots=slots, **{**FAST, **kw}).start()
        assert sched.ready.wait(15) and sched.scanned.wait(15), sched.status()
        started.append(sched)
        return sched

    yield _start
    for sched in started:
        sched.stop()


def zimage_worker(settings, *args):
    env = dict(os.environ, ZIMAGE_HOME=str(settings.home), ZIMAGE_GPUS="none")
    return subprocess.Popen(
        [sys.executable, "-m", "zimage.cli", "worker", "--tick", "0.2", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_cpu_host_runs_queued_jobs_one_at_a_time_in_order(zhome, start):
    ids = [enqueue(zhome, "fake", {"steps": 4, "interval": 0.05}, user="ann", name=f"j{i}") for i in range(3)]
    sched = start()
    wait_for(lambda: all(db_state(sched, r) == "completed" for r in ids), 30, "three completed jobs")
    runs = [status(zhome, r) for r in ids]
    for before, after in zip(runs, runs[1:], strict=False):
        assert after["started"] >= before["ended"]  # never two at once, in queue order
    assert all(r["cuda_visible_devices"] == "" and r["gpu_ids"] == "" for r in runs)
    assert sched.registry.fetch("SELECT count(*) FROM metrics") == [(12,)]
    log = (zhome.runs_dir / ids[0] / "log.txt").read_text()
    assert "launch:" in log and "fake worker pid=" in log and "CUDA_VISIBLE_DEVICES=''" in log


def test_gpu_slots_run_jobs_side_by_side_with_their_own_devices(zhome, start):
    ids = [enqueue(zhome, "fake", {"steps": 30, "interval": 0.05}, name=f"g{i}") for i in range(3)]
    big = enqueue(zhome, "fake", {"steps": 2}, name="big", gpus=3)
    sched = start(SlotConfig(("0", "1")))
    wait_for(lambda: all(status(zhome, r).get("state") == "running" for r in ids[:2]), 15, "two running jobs")
    assert status(zhome, ids[2])["state"] == "queued"  # both slots are taken
    assert sorted(status(zhome, r)["cuda_visible_devices"] for r in ids[:2]) == ["0", "1"]
    wait_for(lambda: status(zhome, ids[2]).get("state") in ("running", "completed"), 15, "the third job")
    wait_for(lambda: db_state(sched, big) == "failed", 20, "the oversized job refused")
    assert "needs 3 GPUs; this host offers 2" in status(zhome, big)["error"]


def test_sigkill_marks_the_run_lost_with_its_last_step(zhome, start):
    run_id = enqueue(zhome, "fake", {"steps": 100000, "interval": 0.01})
    sched = start()
    wait_for(lambda: (status(zhome, run_id).get("step") or 0) >= 5, 15, "a few steps")
    pid = status(zhome, run_id)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: db_state(sched, run_id) == "lost", 30, "state lost")  # within 30 s, or it fails
    st = status(zhome, run_id)
    assert st["step"] >= 5 and st["last_heartbeat"] > 0 and st["ended"] >= st["last_heartbeat"]
    assert f"worker process {pid} ended without a final state (last step {st['step']})" == st["error"]
    row = sched.registry.fetch("SELECT step, last_heartbeat, error FROM runs WHERE run_id = ?", [run_id])[0]
    assert row[0] == st["step"] and row[1] == st["last_heartbeat"] and "without a final state" in row[2]


def test_a_reused_pid_is_not_taken_for_the_worker(zhome, start):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = RunFolder(zhome.runs_dir / "20260101-000000-alive-0000")
        alive.update_status(
            state="running", kind="fake", pid=sleeper.pid, pid_start_time=process_start_time(sleeper.pid)
        )
        reused = RunFolder(zhome.runs_dir / "20260101-000000-reused-0000")
        reused.update_status(state="running", kind="fake", pid=sleeper.pid, pid_start_time=12345.0, step=7)
        sched = start()
        wait_for(lambda: db_state(sched, reused.run_id) == "lost", 10, "the reused PID run lost")
        time.sleep(0.5)
        assert db_state(sched, alive.run_id) == "running"  # a live worker is re-attached, not lost
        assert "last step 7" in reused.read_status()["error"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_pause_resume_save_stop_and_resume_from_checkpoint(zhome, start):
    run_id = enqueue(zhome, "fake", {"steps": 300, "interval": 0.01})
    start()
    wait_for(lambda: (status(zhome, run_id).get("step") or 0) >= 10, 15, "running")
    assert control(zhome, run_id, "pause") == "pause requested"
    wait_for(lambda: status(zhome, run_id)["state"] == "paused", 10, "paused")
    step = status(zhome, run_id)["step"]
    time.sleep(0.4)
    assert status(zhome, run_id)["step"] == step
    control(zhome, run_id, "resume")
    wait_for(lambda: status(zhome, run_id)["step"] > step, 10, "running again")
    control(zhome, run_id, "save_now")
    folder = RunFolder(zhome.runs_dir / run_id)
    wait_for(lambda: any(folder.checkpoints_dir.glob("step-*")), 10, "a checkpoint")
    control(zhome, run_id, "stop")
    wait_for(lambda: status(zhome, run_id)["state"] == "stopped", 10, "stopped")
    saved = int(next(folder.checkpoints_dir.glob("step-*")).name.split("-")[1])
    assert control(zhome, run_id, "resume") == "requeued"
    wait_for(lambda: status(zhome, run_id)["state"] == "completed", 20, "completed after resume")
    assert f"start={saved}" in folder.log_path.read_text()  # continued from its checkpoint


def test_a_failing_worker_reports_its_error(zhome, start):
    run_id = enqueue(zhome, "fake", {"steps": 10, "interval": 0.01, "fail_at": 3})
    sched = start()
    wait_for(lambda: db_state(sched, run_id) == "failed", 15, "failed")
    st = status(zhome, run_id)
    assert st["error"] == "fake failure at step 3" and "RuntimeError" in st["traceback"]
    assert R.run_detail(sched.registry, run_id)["error"] == "fake failure at step 3"


def test_stop_the_scheduler_and_start_it_again_reattaches_and_continues(zhome):
    """Acceptance: the app (here `zimage worker`, a real process) is killed and started again."""
    first = enqueue(zhome, "fake", {"steps": 60, "interval": 0.05}, name="long")
    second = enqueue(zhome, "fake", {"steps": 3, "interval": 0.01}, name="next")
    app = zimage_worker(zhome)
    try:
        wait_for(lambda: status(zhome, first).get("state") == "running", 20, "the first job running")
        os.killpg(app.pid, signal.SIGKILL)  # the whole app process group: workers are in their own sessions
        app.wait()
        pid = status(zhome, first)["pid"]
        assert process_alive(pid, status(zhome, first)["pid_start_time"])
        assert OwnerLock(zhome).owner() is None  # the kernel dropped the dead owner's lock
        assert status(zhome, second)["state"] == "queued"
        app = zimage_worker(zhome)
        wait_for(lambda: status(zhome, first).get("state") == "completed", 30, "the first job completed")
        wait_for(lambda: status(zhome, second).get("state") == "completed", 30, "the queue continued")
        a, b = status(zhome, first), status(zhome, second)
        assert b["started"] >= a["ended"] and a["pid"] == pid  # the same worker finished: re-attached
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        out, _ = app.communicate(timeout=20)
    assert "running jobs keep running" in out


def test_one_scheduler_per_host_and_the_app_takes_over_from_a_worker(zhome, monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    worker = zimage_worker(zhome, "--no-launch")
    try:
        wait_for(lambda: (read_json(zhome.registry_dir / "scheduler.json", {}) or {}).get("pid") == worker.pid, 20,
                 "the worker owning the registry")  # fmt: skip
        refused = subprocess.run(
            [sys.executable, "-m", "zimage.cli", "worker", "--no-wait"],
            env=dict(os.environ, ZIMAGE_HOME=str(zhome.home)), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert refused.returncode == 1 and "already runs in `zimage worker`" in refused.stderr
        queued = enqueue(zhome, "fake", {})
        app = ensure_scheduler(zhome, **FAST)
        assert ensure_scheduler(zhome) is app  # guarded against a second start in the process
        assert app.ready.wait(20), app.status()  # the worker handed the registry over
        assert json.loads((zhome.registry_dir / "scheduler.json").read_text())["role"] == "app"
        assert worker.poll() is None  # it waits in standby
        assert list(R.queue(registry_for(zhome))["run_id"]) == [queued]  # pages read through the app's registry
        assert db_state(app, queued) == "queued"  # ZIMAGE_SCHEDULER_LAUNCH=0: ingest only
        stop_all()
        wait_for(lambda: (read_json(zhome.registry_dir / "scheduler.json", {}) or {}).get("pid") == worker.pid, 20,
                 "the worker taking over again")  # fmt: skip
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.communicate(timeout=20)
