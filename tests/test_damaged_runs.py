"""One damaged file harms only itself: a home seeded with one damaged run-folder file of each kind (and a
damaged dataset.json) still has a working scheduler tick, queue, CLI and pages, and a queued tiny training
run still starts and completes under `zimage worker`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from train_support import fast_config

from zimage.cli import main
from zimage.jobs import enqueue
from zimage.jobs.scheduler import Scheduler
from zimage.jobs.slots import SlotConfig
from zimage.registry.db import Registry
from zimage.registry.ingest import Ingester
from zimage.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
CONFIG = {"model_path": "tiny-zimage", "dataset_path": "demo-shapes", "output_name": "seeded"}
DONE = {"state": "completed", "kind": "train", "user": "ann", "created": 1.0e9, "step": 4, "total_steps": 4}

BAD_PID = "20260101-000001-bad-pid-0001"
STATUS_LIST = "20260101-000002-status-list-0002"
STATUS_FOLDER = "20260101-000003-status-folder-0003"
BAD_CONTROL = "20260101-000004-bad-control-0004"
BAD_CONFIG = "20260101-000005-bad-config-0005"
BAD_METRICS = "20260101-000006-bad-metrics-0006"
CUT_SAMPLES = "20260101-000007-cut-samples-0007"
BAD_PROGRESS = "20260101-000008-bad-progress-0008"
DEAD_WORKER = "20260101-000009-dead-worker-0009"
PROBLEMS = {
    BAD_PID: "status.json: pid must be a whole number, got 'abc'",
    STATUS_LIST: "status.json: must hold a JSON object, found list",
    STATUS_FOLDER: "status.json: is a folder, not a file",
}


def _run(settings, run_id, status, config=CONFIG) -> Path:
    path = settings.runs_dir / run_id
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if status == "folder":
        (path / "status.json").mkdir()
    else:
        (path / "status.json").write_text(status if isinstance(status, str) else json.dumps(status))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def seed(settings) -> None:
    """One damaged file of each kind, each in its own run (or dataset)."""
    _run(settings, BAD_PID, {"state": "running", "pid": "abc", "kind": "train", "user": "ann", "host": HOST})
    _run(settings, STATUS_LIST, '["queued"]')
    _run(settings, STATUS_FOLDER, "folder")
    path = _run(settings, BAD_CONTROL, {**DONE, "state": "running", "pid": _dead_pid(), "host": HOST})
    (path / "control.json").write_text(
        '{"requests": [{"id": "a", "action": "stop", "at": "noon"}, {"id": ["b"], "action": "stop"}, null,'
        ' {"id": "c", "action": "stop", "at": 1e999}, {"id": "d", "action": "pause", "at": 99' + "9" * 400 + "}]}"
    )
    _run(settings, BAD_CONFIG, {"state": "queued", "kind": "train", "user": "ann", "queue_order": 1.0, "gpus": 1},
         config="{not json")  # fmt: skip
    path = _run(settings, BAD_METRICS, DONE)
    (path / "metrics.jsonl").write_bytes(
        b'{"step": 1, "loss": 0.5}\nnull\ngarbage\n{"step": "two"}\n{"step": 3, "loss": NaN}\n'
        + b"[" * 3000
        + b'\n\xff\xfe\n{"step": 4, "loss": 0.25}\n'
    )
    path = _run(settings, CUT_SAMPLES, DONE)
    (path / "samples.jsonl").write_bytes(b'{"step": 2, "path": "samples/a.png", "prompt": "a"}\n{"step": 4, "pa')
    path = _run(settings, BAD_PROGRESS, DONE)
    for name, text in (("step-000002", "[]"), ("step-000004", '{"step": "four", "complete": true')):
        (path / "checkpoints" / name).mkdir(parents=True)
        (path / "checkpoints" / name / "progress.json").write_text(text)
    # A sound run whose worker died without a final state: the tick must still mark it lost.
    _run(settings, DEAD_WORKER, {"state": "running", "kind": "train", "pid": _dead_pid(), "host": HOST,
                                 "pid_start_time": 1.0, "heartbeat": time.time() - 60})  # fmt: skip
    bad_dataset = settings.datasets_dir / "bad-ds"
    (bad_dataset / "images").mkdir(parents=True)
    (bad_dataset / "dataset.json").write_text("{not json")


@pytest.fixture()
def damaged_home(zhome_demo):
    seed(zhome_demo)
    return zhome_demo


def test_a_scheduler_tick_survives_and_still_does_its_work(damaged_home):
    sched = Scheduler(damaged_home, slots=SlotConfig(), watch=False)
    sched.registry = Registry(damaged_home.db_path)
    sched.ingester = Ingester(sched.registry, damaged_home)
    try:
        for _ in range(2):
            assert sched.step(full=True) is None  # raises nothing, twice over
        rows = {r[0]: r[1:] for r in sched.registry.fetch("SELECT run_id, state, problem, malformed_lines FROM runs")}
        datasets = dict(sched.registry.fetch("SELECT name, problem FROM datasets"))
        ckpts = sched.registry.fetch(f"SELECT name, problem FROM checkpoints WHERE run_id = '{BAD_PROGRESS}'")
    finally:
        sched.registry.close()
    for run_id, problem in PROBLEMS.items():
        assert rows[run_id][0] == "damaged" and rows[run_id][1].startswith(problem), rows[run_id]
    assert RunFolder(damaged_home.runs_dir / BAD_PID).read_status() == {}  # damaged runs are left as they are
    assert rows[DEAD_WORKER][0] == "lost" and rows[BAD_CONTROL][0] == "lost"  # dead workers are still marked
    bad_config = RunFolder(damaged_home.runs_dir / BAD_CONFIG).read_status()
    assert bad_config["state"] == "failed" and bad_config["error"].startswith("config.json: not valid JSON")
    assert rows[BAD_CONFIG][0] == "failed" and rows[BAD_CONFIG][1].startswith("config.json: not valid JSON")
    assert rows[BAD_METRICS][2] == 6 and rows[CUT_SAMPLES][0] == "completed"
    assert datasets["bad-ds"].startswith("dataset bad-ds: dataset.json: not valid JSON")
    assert dict(ckpts) == {"step-000002": "progress.json: must hold a JSON object, found list",
                           "step-000004": dict(ckpts)["step-000004"]}  # fmt: skip
    assert dict(ckpts)["step-000004"].startswith("progress.json: not valid JSON")


def test_the_cli_lists_and_queues_and_names_each_problem(damaged_home, tmp_path, capsys):
    assert main(["queue"]) == 0
    out = capsys.readouterr().out
    for run_id, problem in PROBLEMS.items():
        assert f"damaged  {run_id}: run {run_id}: {problem}" in out or f"damaged  {run_id}: {problem}" in out, out
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(fast_config(output_name="after_damage")))
    assert main(["queue", "add", str(cfg)]) == 0
    assert "queued " in capsys.readouterr().out
    assert main(["runs", "list"]) == 0
    out = capsys.readouterr().out
    assert out.count(" damaged ") >= 3 and f"damaged  {BAD_PID}: status.json: pid must be a whole number" in out
    assert main(["runs", "list", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["run_id"]: r["state"] for r in listed}[STATUS_FOLDER] == "damaged"
    assert main(["runs", "show", STATUS_LIST]) == 0
    assert "damaged  status.json: must hold a JSON object, found list" in capsys.readouterr().out
    assert main(["runs", "stop", BAD_PID]) == 2  # an action on a damaged run is refused with the reason
    assert "pid must be a whole number, got 'abc'" in capsys.readouterr().err
    assert main(["datasets"]) == 0
    assert "damaged" in capsys.readouterr().out


CAPTIONING = "pages/2_Captioning.py"
PAGES = [
    "Home.py",
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pages").glob("*.py") if p.name != "2_Captioning.py"),
]


def _render(page: str, **query) -> AppTest:
    at = AppTest.from_file(str(ROOT / page), default_timeout=90)
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, (page, [e.value for e in at.exception])
    return at


@pytest.mark.slow
def test_every_page_renders(damaged_home, monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    shown = {}
    for page in PAGES:
        at = _render(page, **({"run": BAD_PID} if page.endswith("4_Runs.py") else {}))
        shown[page] = [w.value for w in at.warning] + [e.value for e in at.error]
    assert any(f"Run {BAD_PID} is damaged: status.json: pid must be a whole number" in w for w in shown["Home.py"])
    runs_page = "\n".join(shown["pages/4_Runs.py"])
    assert f"Run {STATUS_FOLDER} is damaged: status.json: is a folder" in runs_page
    assert "Damaged: status.json: pid must be a whole number, got 'abc'" in runs_page


@pytest.mark.slow
def test_the_captioning_page_renders(damaged_home, monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    _render(CAPTIONING)


@pytest.mark.slow
def test_a_queued_training_run_completes_under_zimage_worker(damaged_home, tmp_path_factory):
    shared = tmp_path_factory.getbasetemp() / "zimage-shared-train-cache"  # the trainer tests' latent cache
    shared.mkdir(exist_ok=True)
    damaged_home.cache_dir.symlink_to(shared, target_is_directory=True)
    run_id = enqueue(damaged_home, "train", fast_config(output_name="survivor"))
    env = dict(os.environ, ZIMAGE_HOME=str(damaged_home.home), ZIMAGE_GPUS="none", OMP_NUM_THREADS="1")
    worker = subprocess.Popen([sys.executable, "-m", "zimage.cli", "worker", "--tick", "0.2"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    run = RunFolder(damaged_home.runs_dir / run_id)
    try:
        deadline = time.monotonic() + 240
        while run.read_status().get("state") not in ("completed", "failed", "lost"):
            assert worker.poll() is None, worker.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, run.read_status()
            time.sleep(0.2)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        out = worker.communicate(timeout=60)[0].decode()
    status = run.read_status()
    assert status["state"] == "completed" and status["step"] == 4, (status, run.log_path.read_text()[-2000:])
    assert "Traceback" not in out, out[-3000:]
    assert RunFolder(damaged_home.runs_dir / BAD_CONFIG).read_status()["state"] == "failed"
    assert isinstance(RunFolder(damaged_home.runs_dir / BAD_PID).status_or_problem().problem, str)
