"""The scheduler with real detached workers: FIFO, GPU slots, control, faults, restarts.

The workers are the product's: the tiny trainer and the captioner on a tiny BLIP, launched as
`zimage train|caption --run-dir DIR`. Only the test that needs a worker failing at a chosen step launches
tests/support_worker.py, through its test-local `install` hook. A pause asked before a worker starts is
honoured at its first poll, which holds a real worker in place as long as a test needs.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import support_worker
from PIL import Image
from train_support import fast_config

from zimage import registry as R
from zimage.captioning.config import caption_config
from zimage.captioning.tiny import write_tiny_blip
from zimage.data.manage import create_dataset
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


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    path = tmp_path_factory.mktemp("captioner") / "tiny-blip"
    write_tiny_blip(path)
    return path


@pytest.fixture()
def home(zhome_demo_shared_cache):
    return zhome_demo_shared_cache


def captioning(blip, images=("001.png", "002.png"), dataset="demo-shapes"):
    """A caption job of a few images, one per batch, on the CPU (a GPU id given to it must not matter)."""
    return caption_config(dataset=dataset, model=str(blip), images=list(images) if images else None, mode="all",
                          batch_size=1, num_beams=1, max_new_tokens=4, device="cpu", trigger_prefix=False)  # fmt: skip


def paused_in_advance(settings, run_id):
    RunFolder(settings.runs_dir / run_id).send_control("pause")  # acted on at the worker's first poll


def worker_started(settings, run_id):
    """The worker process itself has recorded that it runs (its pid; the launcher leaves that empty)."""
    return bool(status(settings, run_id).get("pid"))


def last_step(settings, run_id):
    """The step of the run's newest metrics line (on disk within half a second of the step)."""
    path = settings.runs_dir / run_id / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")


def repeated_log_lines(path) -> tuple[int, dict[str, int]]:
    """(how many lines the worker logged, those of its messages found more than once in log.txt, with
    or without the time stamp: the launcher sends the worker's stdout and stderr to log.txt as well)."""
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    ours = {STAMP.sub("", line) for line in lines if STAMP.match(line)}
    counts = Counter(STAMP.sub("", line) for line in lines)
    return len(ours), {message: n for message, n in counts.items() if message in ours and n > 1}


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


def test_cpu_host_runs_queued_jobs_one_at_a_time_in_order_each_log_line_once(home, start, tiny_blip):
    ids = [enqueue(home, "train", fast_config(num_steps=4, output_name="first"), user="ann", name="j0"),
           enqueue(home, "caption", captioning(tiny_blip), user="ann", name="j1")]  # fmt: skip
    sched = start()
    wait_for(lambda: db_state(sched, ids[0]) == "completed" and worker_started(home, ids[1]), 90, "the second job")
    runs = [status(home, r) for r in ids]
    assert runs[1]["started"] >= runs[0]["ended"]  # never two at once, in queue order
    assert [r["kind"] for r in runs] == ["train", "caption"]
    assert all(r["cuda_visible_devices"] == "" and r["gpu_ids"] == "" for r in runs)  # what the worker saw
    assert sched.registry.fetch("SELECT count(*) FROM metrics WHERE run_id = ?", [ids[0]]) == [(4,)]
    log = (home.runs_dir / ids[0] / "log.txt").read_text()
    assert "launch: " in log and "Training 4 steps" in log and "Run completed at step 4" in log
    count, repeated = repeated_log_lines(home.runs_dir / ids[0] / "log.txt")
    assert count >= 7 and repeated == {}  # launch, dataset, encodings, LoRA, training, saved, completed


def test_gpu_slots_run_jobs_side_by_side_with_their_own_devices(home, start, tiny_blip):
    ids = [enqueue(home, "caption", captioning(tiny_blip), name=f"g{i}") for i in range(3)]
    for run_id in ids[:2]:
        paused_in_advance(home, run_id)  # both hold their slot until resumed
    big = enqueue(home, "caption", captioning(tiny_blip), name="big", gpus=3)
    sched = start(SlotConfig(("0", "1")))
    wait_for(lambda: all(worker_started(home, r) for r in ids[:2]), 60, "two started jobs")
    assert status(home, ids[2])["state"] == "queued"  # both slots are taken
    assert sorted(status(home, r)["cuda_visible_devices"] for r in ids[:2]) == ["0", "1"]
    for run_id in ids[:2]:
        control(home, run_id, "stop")
    wait_for(lambda: worker_started(home, ids[2]), 60, "the third job")
    wait_for(lambda: db_state(sched, big) == "failed", 60, "the oversized job refused")
    assert "needs 3 GPUs; this host offers 2" in status(home, big)["error"]
    assert [status(home, r)["state"] for r in ids[:2]] == ["stopped", "stopped"]
    assert status(home, ids[2])["cuda_visible_devices"] in ("0", "1")


def test_sigkill_marks_the_run_lost_with_its_last_step(home, start, tiny_blip):
    folder = create_dataset(home, "many")
    for i in range(300):
        Image.new("RGB", (16, 16), (i % 256, 90, 200)).save(folder.images_dir / f"{i:03d}.png")
    run_id = enqueue(home, "caption", captioning(tiny_blip, images=None, dataset="many"))
    sched = start()
    wait_for(lambda: (status(home, run_id).get("step") or 0) >= 5, 60, "a few images")
    pid = status(home, run_id)["pid"]
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: db_state(sched, run_id) == "lost", 30, "state lost")
    assert time.monotonic() - killed < 30
    st = status(home, run_id)
    assert 5 <= st["step"] < 300 and st["last_heartbeat"] > 0 and st["ended"] >= st["last_heartbeat"]
    assert f"worker process {pid} ended without a final state (last step {st['step']})" == st["error"]
    row = sched.registry.fetch("SELECT step, last_heartbeat, error FROM runs WHERE run_id = ?", [run_id])[0]
    assert row[0] == st["step"] and row[1] == st["last_heartbeat"] and "without a final state" in row[2]


def test_a_reused_pid_is_not_taken_for_the_worker(zhome, start):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = RunFolder(zhome.runs_dir / "20260101-000000-alive-0000")
        alive.update_status(
            state="running", kind="caption", pid=sleeper.pid, pid_start_time=process_start_time(sleeper.pid)
        )
        reused = RunFolder(zhome.runs_dir / "20260101-000000-reused-0000")
        reused.update_status(state="running", kind="caption", pid=sleeper.pid, pid_start_time=12345.0, step=7)
        sched = start()
        wait_for(lambda: db_state(sched, reused.run_id) == "lost", 10, "the reused PID run lost")
        time.sleep(0.5)
        assert db_state(sched, alive.run_id) == "running"  # a live worker is re-attached, not lost
        assert "last step 7" in reused.read_status()["error"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_pause_resume_save_stop_and_resume_from_checkpoint(home, start):
    run_id = enqueue(home, "train", fast_config(num_steps=100000, output_name="controlled"))
    folder = RunFolder(home.runs_dir / run_id)
    start()
    wait_for(lambda: last_step(home, run_id) >= 10, 90, "training")
    assert control(home, run_id, "pause") == "pause requested"
    wait_for(lambda: status(home, run_id)["state"] == "paused", 20, "paused")
    step = status(home, run_id)["step"]
    time.sleep(0.6)
    assert status(home, run_id)["step"] == step and last_step(home, run_id) == step  # no step while paused
    control(home, run_id, "resume")
    wait_for(lambda: last_step(home, run_id) > step, 20, "training again")
    control(home, run_id, "save_now")
    wait_for(lambda: any(folder.checkpoints_dir.glob("step-*")), 20, "a checkpoint")
    control(home, run_id, "stop")
    wait_for(lambda: status(home, run_id)["state"] == "stopped", 30, "stopped")
    saved = status(home, run_id)["step"]  # the stop saved a checkpoint there too: the newest
    assert sorted(p.name for p in folder.checkpoints_dir.glob("step-*"))[-1] == f"step-{saved:06d}"
    assert control(home, run_id, "resume") == "requeued"
    # The resumed worker continues from the checkpoint and is not stopped again by the old request.
    wait_for(lambda: last_step(home, run_id) > saved, 90, "training after the resume")  # the old stop did not act again
    st = status(home, run_id)
    assert st["state"] == "running" and st["resumed_from_step"] == saved and st["resumes"] == 1
    control(home, run_id, "stop")
    wait_for(lambda: status(home, run_id)["state"] == "stopped", 30, "stopped again")
    log = folder.log_path.read_text()
    assert f"Resumed from step-{saved:06d}: continuing after step {saved}" in log
    assert log.count("Stopping: stop requested from the app") == 2  # one per stop request, not one more
    assert sorted(folder.handled_control()) == sorted(r["id"] for r in folder.read_control())


def test_a_failing_worker_reports_its_error(zhome, start, monkeypatch):
    support_worker.install(monkeypatch)  # a worker that fails at a chosen step, like no real one does on cue
    run_id = enqueue(zhome, support_worker.KIND, {"steps": 10, "interval": 0.01, "fail_at": 3})
    sched = start()
    wait_for(lambda: db_state(sched, run_id) == "failed", 30, "failed")
    st = status(zhome, run_id)
    message = "RuntimeError: support worker failure at step 3"
    assert st["error"] == message and "raise RuntimeError" in st["traceback"] and st["step"] == 2
    assert R.run_detail(sched.registry, run_id)["error"] == message


def test_stop_the_scheduler_and_start_it_again_reattaches_and_continues(home, tiny_blip):
    """Acceptance: the app (here `zimage worker`, a real process) is killed and started again."""
    first = enqueue(home, "caption", captioning(tiny_blip), name="long")
    paused_in_advance(home, first)  # it holds its slot, across the restart, until resumed
    second = enqueue(home, "caption", captioning(tiny_blip, images=("003.png",)), name="next")
    app = zimage_worker(home)
    try:
        wait_for(lambda: status(home, first).get("state") == "paused", 60, "the first job started")
        os.killpg(app.pid, signal.SIGKILL)  # the whole app process group: workers are in their own sessions
        app.wait()
        pid = status(home, first)["pid"]
        assert process_alive(pid, status(home, first)["pid_start_time"])
        assert OwnerLock(home).owner() is None  # the kernel dropped the dead owner's lock
        assert status(home, second)["state"] == "queued"
        app = zimage_worker(home)
        wait_for(lambda: (read_json(home.registry_dir / "scheduler.json", {}) or {}).get("pid") == app.pid, 30,
                 "the new app owning the registry")  # fmt: skip
        control(home, first, "resume")
        wait_for(lambda: status(home, first).get("state") == "completed", 60, "the first job completed")
        wait_for(lambda: worker_started(home, second), 60, "the queue continued")
        a, b = status(home, first), status(home, second)
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
        queued = enqueue(zhome, "caption", caption_config(dataset="demo-shapes", model="blip-base"))
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
