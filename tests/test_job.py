"""The one job lifecycle (zimage.job): start, heartbeat, final states, failures of every kind, signals, echo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zimage.errors import UserError
from zimage.job import Job, run_job
from zimage.runfolder import RunFolder, process_start_time

ROOT = Path(__file__).resolve().parents[1]


def test_a_job_runs_from_starting_to_completed_with_its_fields(tmp_path):
    run = RunFolder(tmp_path / "run")
    seen = {}

    def work(job: Job) -> dict:
        seen["start"] = run.read_status()
        job.status(state="running", step=0)
        for step in (1, 2, 3):
            job.add_metrics({"step": step, "loss": 1.0 / step})
            job.progress(step=step)
        return {"state": "completed", "step": 3, "output_path": "out.bin"}

    assert run_job(run.path, "demo", work, total_steps=3) == 0
    start = seen["start"]
    assert start["state"] == "starting" and start["kind"] == "demo" and start["total_steps"] == 3
    assert start["pid"] == os.getpid() and start["pid_start_time"] == pytest.approx(process_start_time(os.getpid()))
    assert start["host"] and start["cuda_visible_devices"] == os.environ.get("CUDA_VISIBLE_DEVICES")
    status = run.read_status()
    assert (status["state"], status["step"], status["output_path"]) == ("completed", 3, "out.bin")
    assert status["error"] is None
    assert status["ended"] >= status["started"]
    assert [line.count('"step"') for line in run.metrics_path.read_text().splitlines()] == [1, 1, 1]
    assert run.log_path.read_text().rstrip().endswith("Run completed at step 3")
    assert run_job(tmp_path / "run2", "demo", lambda job: "stopped") == 0
    assert RunFolder(tmp_path / "run2").read_status()["state"] == "stopped"


@pytest.mark.parametrize(
    ("error", "message", "traceback_has", "state"),
    [
        (RuntimeError("boom at step 2"), "RuntimeError: boom at step 2", "boom at step 2", "running"),
        (UserError("the loss became nan: lower learning_rate"), "the loss became nan: lower learning_rate",
         "UserError", "running"),  # advice, but where it happened too
        (UserError("dataset: no such dataset 'x'"), "dataset: no such dataset 'x'", None, "starting"),  # a refusal
        (KeyboardInterrupt(), "KeyboardInterrupt", "KeyboardInterrupt", "running"),
        (SystemExit(3), "SystemExit: 3", "SystemExit", "starting"),
    ],
)  # fmt: skip
def test_every_failure_ends_failed_on_disk_with_its_reason(tmp_path, error, message, traceback_has, state):
    run = RunFolder(tmp_path / "run")

    def work(job: Job):
        if state == "running":
            job.status(state="running")
        job.progress(step=2, captioned=5)
        raise error

    assert run_job(run.path, "demo", work) == 1
    status = run.read_status()
    assert status["state"] == "failed" and status["error"] == message and status["ended"] >= status["started"]
    assert (status["step"], status["captioned"]) == (2, 5)  # the newest live fields, not the last periodic write
    if traceback_has is None:
        assert status["traceback"] is None
    else:
        assert traceback_has in status["traceback"] and "in work" in status["traceback"]
    assert f"Failed: {message}" in run.log_path.read_text()


def test_a_failure_while_reporting_the_end_still_ends_failed(tmp_path):
    run = RunFolder(tmp_path / "run")

    def work(job: Job) -> str:
        job.add_metrics({"step": 1, "loss": 0.5})
        run.metrics_path.unlink(missing_ok=True)
        run.metrics_path.mkdir()  # the final flush of the pending metrics line fails, like a full disk
        return "completed"

    assert run_job(run.path, "demo", work) == 1
    status = run.read_status()
    assert status["state"] == "failed" and status["error"].startswith("IsADirectoryError")


def test_cleanup_runs_after_the_final_state_and_its_error_does_not_change_it(tmp_path):
    run = RunFolder(tmp_path / "run")
    states = []

    def work(job: Job) -> str:
        job.at_end(lambda: states.append(run.read_status()["state"]))
        job.at_end(lambda: 1 / 0)
        return "completed"

    assert run_job(run.path, "demo", work) == 0
    assert states == ["completed"] and run.read_status()["state"] == "completed"
    assert "Cleanup failed: ZeroDivisionError" in run.log_path.read_text()


def test_sigterm_asks_for_a_graceful_stop_and_a_second_signal_gives_up(tmp_path):
    run = RunFolder(tmp_path / "run")
    reasons = []

    def graceful(job: Job) -> dict:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered in this (the main) thread before kill() returns
        assert job.poll_control().stop and job.stop_reason == "received SIGTERM"
        job.when_stopped(reasons.append)  # a kind that stops by itself hears of it too, at once
        return {"state": "stopped", "step": 1}

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert run_job(run.path, "demo", graceful) == 0
    assert run.read_status()["state"] == "stopped" and reasons == ["received SIGTERM"]
    assert "Stopping: received SIGTERM" in run.log_path.read_text()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # the handlers are put back

    def stubborn(job: Job) -> str:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the second one interrupts
        return "completed"

    other = RunFolder(tmp_path / "other")
    assert run_job(other.path, "demo", stubborn) == 1
    status = other.read_status()
    assert status["state"] == "failed" and status["error"] == "KeyboardInterrupt: received SIGINT again while stopping"


def test_heartbeat_keeps_status_fresh_while_the_worker_is_busy(tmp_path):
    run = RunFolder(tmp_path / "run")
    job = Job(run)
    job.status(state="running", step=3)
    first = run.read_status()["heartbeat"]
    job.progress(step=4, phase="caching latents")  # memory only: the worker itself writes nothing more
    beats = set()
    job.start_heartbeat(interval=0.05)
    try:
        deadline = time.monotonic() + 10
        while len(beats) < 3 and time.monotonic() < deadline:
            beat = run.read_status().get("heartbeat")
            if beat != first:
                beats.add(beat)
            time.sleep(0.01)
    finally:
        job.stop_heartbeat()
    assert len(beats) >= 3  # it keeps beating, not just once
    status = run.read_status()
    assert (status["state"], status["step"], status["phase"]) == ("running", 4, "caching latents")


def test_a_launched_worker_logs_each_line_once(tmp_path):
    """The launcher sends a worker's stdout and stderr to log.txt; echoing the log there again doubles it."""
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    script = (
        "import sys\nfrom zimage.job import run_job\n"
        "def work(job):\n    job.log('hello from the worker')\n    print('a plain print', flush=True)\n"
        "sys.exit(run_job(sys.argv[1], 'demo', work, echo=lambda m: print(m, file=sys.stderr, flush=True)))\n"
    )
    with open(run.log_path, "ab") as log:
        proc = subprocess.run([sys.executable, "-c", script, str(run.path)], stdout=log, stderr=subprocess.STDOUT,
                              cwd=ROOT, timeout=60)  # fmt: skip
    assert proc.returncode == 0
    text = run.log_path.read_text()
    assert text.count("hello from the worker") == 1 and text.count("a plain print") == 1
    # In a terminal the same job echoes its log lines.
    shown = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run2")], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)  # fmt: skip
    assert shown.returncode == 0 and "hello from the worker" in shown.stderr
    assert "hello from the worker" in (tmp_path / "run2" / "log.txt").read_text()


def test_without_a_run_folder_everything_stays_in_memory():
    job = Job()
    job.log("a line")
    job.add_metrics({"step": 1, "loss": 0.5})
    assert job.status(state="running", step=1) == {"state": "running", "step": 1}
    job.start_heartbeat()
    job.stop_heartbeat()
    assert job.lines == ["a line"] and job.metrics == [{"step": 1, "loss": 0.5}] and job.run is None
    assert not job.poll_control().stop


def test_a_failure_with_values_json_cannot_hold_still_ends_failed_with_its_reason(tmp_path):
    """The final write of `failed` carries the newest live fields; a NaN loss or an object there must not
    make that write fail (or leave a file other readers refuse)."""
    from zimage.records import parse_json

    run = RunFolder(tmp_path / "run")

    def work(job: Job):
        job.status(state="running", step=0)
        job.progress(step=2, loss=float("nan"), eta=float("inf"), where=Path("/data/x"), seen={1})
        raise RuntimeError("diverged")

    assert run_job(run.path, "demo", work) == 1
    status = parse_json(run.status_path.read_text())  # a strict reader: NaN / Infinity are refused
    assert (status["state"], status["error"], status["step"]) == ("failed", "RuntimeError: diverged", 2)
    assert (status["loss"], status["eta"], status["where"]) == (None, None, "/data/x")


def test_a_phase_change_puts_the_pending_metrics_on_disk_first(tmp_path):
    """The trainer logs 'saving checkpoint' before it writes a checkpoint: every metrics line of the steps
    that checkpoint holds must be in metrics.jsonl by then, not half a second later (a kill in between and
    a resume from the checkpoint would lose them for good)."""
    run = RunFolder(tmp_path / "run")
    job = Job(run)
    job.status(state="running", step=0)
    job.start_heartbeat(interval=60)  # the background writer runs, as in a real worker
    try:
        for step in (1, 2, 3):
            job.add_metrics({"step": step, "loss": 1.0})
        job.status(phase="saving checkpoint")
        on_disk = [json.loads(line)["step"] for line in run.metrics_path.read_text().splitlines()]
        assert on_disk == [1, 2, 3]
        job.add_metrics({"step": 4, "loss": 1.0})
        job.flush_metrics()  # the call point the checkpoint code uses
        assert run.metrics_path.read_text().count("\n") == 4
    finally:
        job.stop_heartbeat()


def test_malformed_control_values_never_fail_a_running_job(tmp_path):
    """A running job polls control.json every step; damage there is skipped with a line in log.txt, and a
    good stop request written after it still stops the job."""
    run = RunFolder(tmp_path / "run")
    damage = [
        b'{"requests": [{"id": "a", "action": "stop", "at": "noon"}]}',
        b'{"requests": [{"id": "b", "action": "stop", "at": 1e999999}]}',
        b'{"requests": [null, {"id": ["c"], "action": "stop"}]}',
        b"[" * 50_000,  # nested deeper than Python's parser goes
        b'{"requests": 7}',
    ]

    def work(job: Job) -> dict:
        job.status(state="running", step=0)
        for step, content in enumerate(damage, 1):
            run.control_path.write_bytes(content)
            for _ in range(3):
                assert not job.poll_control().stop
            job.progress(step=step)
        run.send_control("stop")
        assert job.poll_control().stop
        return {"state": "stopped", "step": len(damage)}

    assert run_job(run.path, "demo", work) == 0
    status = run.read_status()
    assert (status["state"], status["step"]) == ("stopped", len(damage))
    ignored = [ln for ln in run.log_path.read_text().splitlines() if ln.endswith("; ignored")]
    assert len(ignored) == 6, ignored  # one per bad request or damaged file, not one per poll
    assert any("request 1: at must be a number, got 'noon'" in ln for ln in ignored)
    assert any("control.json: not valid JSON" in ln for ln in ignored)


def test_a_worker_never_revives_a_run_cancelled_before_it_started(tmp_path):
    # A cluster job a late submission made after the person took the run out of the line: the worker
    # leaves the run as the person left it.
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.update_status(state="stopped", cancelled=True, ended=123.0)
    before = run.read_status()
    ran = []
    assert run_job(run.path, "demo", lambda job: ran.append(1)) == 0
    assert not ran and run.read_status() == before
    assert "cancelled before this worker started" in run.log_path.read_text()

    run.update_status(state="queued", cancelled=False)  # requeued: a worker runs it again
    assert run_job(run.path, "demo", lambda job: ran.append(1)) == 0
    assert ran == [1] and run.read_status()["state"] == "completed"
