import json
import subprocess
import sys

import pytest

from zimage.runfolder import ControlRequests, RunFolder, process_start_time


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
    assert worker.poll_control() == ControlRequests()  # no control.json yet
    app.send_control("save_now")
    app.send_control("save_now", user="ann")
    app.send_control("pause")
    written = app.control_path.read_bytes()
    assert worker.poll_control() == ControlRequests(pause=True, save_now=True)  # two save-now requests: one save
    assert worker.poll_control() == ControlRequests(pause=True)  # the wanted state stays; save-now fired once
    assert app.control_path.read_bytes() == written  # the worker never writes control.json
    app.send_control("resume")
    app.send_control("sample_now")
    app.send_control("stop")
    assert worker.poll_control() == ControlRequests(stop=True, sample_now=True)
    requests = app.read_control()
    assert [r["action"] for r in requests] == ["save_now", "save_now", "pause", "resume", "sample_now", "stop"]
    assert requests[1]["user"] == "ann" and len({r["id"] for r in requests}) == 6
    assert worker.read_status()["control_done"] == [r["id"] for r in requests]  # recorded, in order
    # The next process of this run (a resume) finds them handled: no stop, no second save.
    assert RunFolder(tmp_path / "r").poll_control() == ControlRequests()
    with pytest.raises(ValueError, match="allowed"):
        app.send_control("explode")


def test_the_newest_pause_or_resume_wins_and_quick_requests_are_all_seen(tmp_path):
    app, worker = RunFolder(tmp_path / "r"), RunFolder(tmp_path / "r")
    for actions, paused in ((["pause", "resume", "pause"], True), (["resume", "pause", "resume"], False)):
        for action in actions:
            app.send_control(action)
        assert worker.poll_control().pause is paused
    for _ in range(30):  # back-to-back rewrites (with coarse timestamps they share an mtime): each one seen
        app.send_control("save_now")
        assert worker.poll_control().save_now
    assert len(worker.handled_control()) == 36


def test_retired_requests_do_not_reach_the_resumed_worker(tmp_path):
    app = RunFolder(tmp_path / "r")
    app.update_status(state="lost")
    app.send_control("stop")  # sent to a worker that died before it polled
    app.send_control("save_now")
    app.retire_control()  # what requeue and `zimage train --resume` do
    resumed = RunFolder(tmp_path / "r")
    assert resumed.poll_control() == ControlRequests()
    app.send_control("pause")  # a request to the resumed worker itself is acted on
    assert resumed.poll_control() == ControlRequests(pause=True)
    assert len(resumed.handled_control()) == 3


def test_a_damaged_control_file_holds_no_requests_and_the_next_one_replaces_it(tmp_path):
    app, worker = RunFolder(tmp_path / "r"), RunFolder(tmp_path / "r")
    app.path.mkdir()
    app.control_path.write_text('{"requests": [{"id": 7, "action": "stop"}, {"id": "x", "action": "expl')
    assert app.read_control() == [] and worker.poll_control() == ControlRequests()
    app.control_path.write_text('{"stop": true, "pause": true}')  # the format before request ids
    assert worker.poll_control() == ControlRequests()
    app.send_control("stop")
    assert [r["action"] for r in app.read_control()] == ["stop"] and worker.poll_control().stop


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
