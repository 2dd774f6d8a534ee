import json
import subprocess
import sys

import pytest

from zimage.runfolder import RunFolder, process_start_time


def test_status_is_merged_and_atomic(tmp_path):
    rf = RunFolder(tmp_path / "r1")
    rf.update_status(state="queued", kind="train", user="ann")
    st = rf.mark_worker_started("train", total_steps=10)
    assert st["state"] == "starting" and st["user"] == "ann" and st["total_steps"] == 10
    assert st["pid_start_time"] == pytest.approx(process_start_time(st["pid"]))
    assert rf.worker_alive()
    assert [p.name for p in rf.path.iterdir()] == ["status.json"]  # no temp files left
    with pytest.raises(ValueError, match="unknown state"):
        rf.update_status(state="exploded")


def test_dead_or_reused_pid_is_not_alive(tmp_path):
    rf = RunFolder(tmp_path / "r")
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    rf.update_status(state="running", pid=proc.pid, pid_start_time=1.0)
    assert not rf.worker_alive()
    import os

    rf.update_status(pid=os.getpid(), pid_start_time=12345.0)  # live PID, other start time: reused
    assert not rf.worker_alive()


def test_control_requests_fire_once(tmp_path):
    app, worker = RunFolder(tmp_path / "r"), RunFolder(tmp_path / "r")
    assert worker.poll_control() == worker.poll_control()
    app.send_control("save_now")
    app.send_control("pause")
    req = worker.poll_control()
    assert req.save_now and req.pause and not req.stop and not req.sample_now
    again = worker.poll_control()
    assert not again.save_now and again.pause
    app.send_control("resume")
    app.send_control("sample_now")
    app.send_control("stop")
    req = worker.poll_control()
    assert req.sample_now and req.stop and not req.pause and not req.save_now
    with pytest.raises(ValueError, match="allowed"):
        app.send_control("explode")


def test_metrics_lines_are_whole_json(tmp_path):
    rf = RunFolder(tmp_path / "r")
    rf.path.mkdir()
    for i in range(3):
        rf.append_metrics({"step": i, "loss": 0.5 / (i + 1)})
    lines = rf.metrics_path.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2]
    with pytest.raises(ValueError):
        rf.append_metrics({"step": 3, "loss": float("nan")})


def test_pending_metrics_go_out_together_and_a_failed_write_loses_none(tmp_path):
    from zimage.training.reporting import Reporter

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.metrics_path.mkdir()  # writing fails (IsADirectoryError), as a full disk would
    reporter = Reporter(run)
    with pytest.raises(OSError):
        reporter.add_metrics({"step": 1, "loss": 0.5})
    with pytest.raises(OSError):
        reporter.add_metrics({"step": 2, "loss": 0.4})
    run.metrics_path.rmdir()
    reporter.add_metrics({"step": 3, "loss": 0.3})  # the two kept lines go out first, in one write
    lines = run.metrics_path.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    run.append_metrics()  # nothing to write: no empty line either
    assert run.metrics_path.read_text().count("\n") == 3


def test_heartbeat_keeps_status_fresh_while_the_worker_is_busy(tmp_path):
    import time

    run = RunFolder(tmp_path / "run")
    run.update_status(state="running", step=3)
    first = run.read_status()["heartbeat"]
    with run.heartbeat(interval=0.05):
        time.sleep(0.3)  # a model download, a slow batch: the worker writes nothing itself
        run.update_status(step=4)  # the worker's own writes still land whole
        time.sleep(0.2)
    status = run.read_status()
    assert status["heartbeat"] > first + 0.3 and status["step"] == 4 and status["state"] == "running"
