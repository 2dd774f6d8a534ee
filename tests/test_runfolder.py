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


def test_malformed_control_requests_are_skipped_with_one_log_line_each(tmp_path):
    """A bad value in control.json (text, a list, null, a huge number, an unknown action) acts on nothing
    and is said once in log.txt however often the worker polls; the well-formed requests beside it act."""
    app, worker = RunFolder(tmp_path / "r"), RunFolder(tmp_path / "r")
    app.update_status(state="running")
    bad = [
        {"id": "a", "action": "stop", "at": "soon"},
        {"id": "b", "action": ["stop"]},
        {"id": None, "action": "stop"},
        {"id": "c", "action": "stop", "at": 1e999},  # json.loads reads it as infinity
        {"id": "d", "action": "explode"},
        None,
    ]
    good = {"id": "e", "action": "pause", "at": 1.0}
    text = json.dumps({"requests": [*bad, good]}).replace("Infinity", "1e999")
    app.control_path.write_text(text)
    assert worker.poll_control() == ControlRequests(pause=True)
    assert app.read_control() == [good]
    log = app.log_path.read_text()
    for number in range(1, 7):
        assert log.count(f"control.json: request {number}: ") == 1, log
    assert "request 1: at must be a number, got 'soon'; ignored" in log
    assert "request 4: at must be a finite number" in log and "request 5: action input should be" in log
    app.control_path.write_text(text.replace('"e"', '"f"'))  # rewritten: the same bad entries are not said again
    assert worker.poll_control() == ControlRequests(pause=True)
    assert app.log_path.read_text().count("control.json: request 1: ") == 1
    assert worker.handled_control() == ["e", "f"]


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"[" * 100_000, ["control.json: not valid JSON (nested too deeply)"]),
        (b'{"requests": {"id": "a"}}', ["control.json: requests must be a list"]),
        (b'["stop"]', ["control.json: must hold a JSON object, found list"]),
        (b'{"requests": [1, "stop"]}', ["request 1: must hold a JSON object", "request 2: must hold a JSON object"]),
        (b"\xff\xfe", ["control.json: not UTF-8 text"]),
        (b"1e999", ["control.json: must hold a JSON object, found float"]),  # one number, read as infinity
    ],
)
def test_a_damaged_control_file_never_raises_in_the_worker(tmp_path, content, said):
    run = RunFolder(tmp_path / "r")
    run.update_status(state="running")
    run.control_path.write_bytes(content)
    for _ in range(3):
        assert run.poll_control() == ControlRequests()
    lines = [ln for ln in run.log_path.read_text().splitlines() if "control.json" in ln]
    assert len(lines) == len(said) and all(ln.endswith("; ignored") for ln in lines), lines  # once, not per poll
    for line, words in zip(lines, said, strict=True):
        assert words in line


def test_status_is_written_as_plain_json_whatever_the_values(tmp_path):
    from pathlib import Path

    from zimage.records import parse_json

    rf = RunFolder(tmp_path / "r")
    rf.update_status(state="running", loss=float("nan"), eta=float("inf"), where=Path("/x"), seen={3}, step=2)
    status = parse_json(rf.status_path.read_text())  # refuses NaN / Infinity
    assert (status["loss"], status["eta"], status["step"]) == (None, None, 2)
    assert (status["where"], status["seen"]) == ("/x", [3])
    assert rf.read_status()["state"] == "running"


def test_a_damaged_status_is_named_for_the_app_and_rewritten_by_the_worker(tmp_path):
    from zimage.records import Damaged
    from zimage.runfolder import DamagedRun

    rf = RunFolder(tmp_path / "r")
    rf.path.mkdir()
    rf.status_path.write_text('{"state": "running", "pid": "abc", "kind": "train"}')
    problem = rf.status_or_problem()
    assert isinstance(problem, Damaged)
    assert problem.problem == "run r: status.json: pid must be a whole number, got 'abc'"
    assert rf.read_status() == {} and not rf.worker_alive()
    with pytest.raises(DamagedRun, match="pid must be a whole number"):
        rf.checked_status()
    rf.update_status(state="running", step=3)  # the worker owns its status.json: it writes what it knows
    assert rf.read_status()["step"] == 3
    assert "status.json: pid must be a whole number, got 'abc'; rewritten" in rf.log_path.read_text()
