"""`zimage queue|runs|registry|worker` as real processes, while another process owns the registry."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from train_support import fast_config

from zimage.captioning.config import caption_config
from zimage.captioning.tiny import write_tiny_blip
from zimage.jobs.launcher import process_alive
from zimage.jobs.queue import queued_runs
from zimage.jobs.scheduler import Scheduler
from zimage.jobs.slots import SlotConfig
from zimage.runfolder import RunFolder, read_json


def zimage(settings, *args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "zimage.cli", *args],
        env=dict(os.environ, ZIMAGE_HOME=str(settings.home)),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    # whatever happens, a user never sees a traceback or a database lock error
    assert "Traceback" not in proc.stderr and "lock" not in proc.stderr.lower(), proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def state(settings, run_id):
    return RunFolder(settings.runs_dir / run_id).read_status().get("state")


@pytest.fixture()
def home(zhome_demo_shared_cache):
    return zhome_demo_shared_cache


@pytest.fixture()
def app(home):
    """The app's scheduler, in this process, holding registry.duckdb open read-write."""
    sched = Scheduler(home, slots=SlotConfig(), tick=0.2, rescan=1.0).start()
    assert sched.ready.wait(15) and sched.scanned.wait(15)
    yield sched
    sched.stop()
    for run_dir in home.runs_dir.iterdir():
        st = read_json(run_dir / "status.json", {}) or {}
        if st.get("pid") and process_alive(st["pid"], st.get("pid_start_time")):
            os.kill(st["pid"], signal.SIGKILL)


def test_queue_and_runs_commands_while_the_app_owns_the_registry(home, app, tmp_path):
    train = tmp_path / "train.json"  # the tiny trainer: it trains until it is stopped
    train.write_text(json.dumps(fast_config(num_steps=100000, output_name="first")))
    write_tiny_blip(tmp_path / "tiny-blip")
    caption = tmp_path / "caption.json"
    caption.write_text(json.dumps(caption_config(dataset="demo-shapes", model=str(tmp_path / "tiny-blip"),
                                                 images=["001.png"], mode="all", num_beams=1, device="cpu")))  # fmt: skip

    def add(cfg, name: str, *kind: str) -> str:
        return zimage(home, "queue", "add", str(cfg), "--name", name, *kind).stdout

    first = add(train, "first").split()[1]
    assert (home.runs_dir / first / "config.json").exists()
    wait_for(lambda: state(home, first) == "running", 90)
    second = add(caption, "second", "--kind", "caption").split()[1]
    RunFolder(home.runs_dir / second).send_control("pause")  # it waits, once started, until it is stopped
    third = add(caption, "third", "--kind", "caption")
    assert "(position 2)" in third
    third = third.split()[1]

    shown = zimage(home, "queue").stdout
    assert "scheduler: the zimage app (pid" in shown
    lines = [ln.split() for ln in shown.splitlines()[2:]]
    assert [(ln[0], ln[1], ln[4]) for ln in lines] == [
        ("-", first, "running"),
        ("1", second, "queued"),
        ("2", third, "queued"),
    ]
    assert "now at position 1" in zimage(home, "queue", "up", third).stdout
    assert [rid for rid, _ in queued_runs(home)] == [third, second]
    assert "cancelled" in zimage(home, "queue", "cancel", third).stdout
    assert state(home, third) == "stopped"

    listed = [json.loads(ln) for ln in zimage(home, "runs", "list", "--json").stdout.splitlines()]
    assert {r["run_id"]: r["state"] for r in listed} == {first: "running", second: "queued", third: "stopped"}
    assert "user" in listed[0] and {r["run_id"]: r["kind"] for r in listed}[first] == "train"
    assert {r["run_id"]: r["kind"] for r in listed}[second] == "caption"
    assert [
        json.loads(ln)["run_id"]
        for ln in zimage(home, "runs", "list", "--state", "queued", "--json").stdout.splitlines()
    ] == [second]
    assert second in zimage(home, "runs", "list", "--text", "SECOND").stdout

    wait_for(lambda: (home.runs_dir / first / "metrics.jsonl").exists(), 60)  # a step trained
    assert "pause requested" in zimage(home, "runs", "pause", first).stdout
    wait_for(lambda: state(home, first) == "paused")
    shown = zimage(home, "runs", "show", first).stdout
    assert "state    paused" in shown and "metrics  step=" in shown
    assert json.loads(zimage(home, "runs", "show", first, "--json").stdout)["status"]["state"] == "paused"
    zimage(home, "runs", "resume", first)
    wait_for(lambda: state(home, first) == "running")
    assert "stop requested" in zimage(home, "runs", "stop", first).stdout
    wait_for(lambda: state(home, first) == "stopped", 60)
    wait_for(lambda: state(home, second) in ("starting", "running", "paused"), 60)  # the queue moved on by itself
    zimage(home, "runs", "stop", second)

    refused = zimage(home, "runs", "delete", third, check=False)
    assert refused.returncode == 2 and "add --yes" in refused.stderr
    assert "deleted" in zimage(home, "runs", "delete", third, "--yes").stdout
    assert not (home.runs_dir / third).exists()
    missing = zimage(home, "runs", "show", third, check=False)
    assert missing.returncode == 2 and "no such run" in missing.stderr

    rebuilt = zimage(home, "registry", "rebuild").stdout
    assert "rebuilt by the zimage app" in rebuilt and "2 runs" in rebuilt
    assert "owner     the zimage app" in zimage(home, "registry", "status").stdout
    wait_for(lambda: app.registry.fetch("SELECT count(*) FROM runs WHERE state = 'stopped'") == [(2,)], 60)


def test_queue_add_validates_a_training_config_first(zhome_demo, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_path: tiny-zimage\nlora_rnak: 8\n")
    proc = zimage(zhome_demo, "queue", "add", str(bad), check=False)
    assert proc.returncode == 2 and "lora_rnak" in proc.stderr
    assert not zhome_demo.runs_dir.exists() or list(zhome_demo.runs_dir.iterdir()) == []
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"model_path": "tiny-zimage", "dataset_path": "demo-shapes", "output_name": "cli-lora"}))
    out = zimage(zhome_demo, "queue", "add", str(good), "--preset", "quick_test", "--set", "resolution=256").stdout
    run_id = out.split()[1]
    config = json.loads((zhome_demo.runs_dir / run_id / "config.json").read_text())
    assert config["resolution"] == 256 and config["output_name"] == "cli-lora" and config["lora_rank"] == 8
    status = RunFolder(zhome_demo.runs_dir / run_id).read_status()
    assert status["kind"] == "train" and status["state"] == "queued" and status["user"]


def test_runs_show_warns_about_a_silent_worker(zhome):
    from zimage.runfolder import process_start_time

    me = os.getpid()
    for run_id, pid in (("quiet-alive", me), ("quiet-gone", 2**22 + 12345)):
        rf = RunFolder(zhome.runs_dir / run_id)
        rf.write_config({"output_name": run_id})
        rf.update_status(state="running", kind="train", user="ann", step=5, total_steps=10, pid=pid,
                         pid_start_time=process_start_time(pid) if pid == me else 1.0)  # fmt: skip
        status = rf.read_status()
        status["heartbeat"] = time.time() - 600
        rf.status_path.write_text(json.dumps(status))
    alive = zimage(zhome, "runs", "show", "quiet-alive").stdout
    assert "warning  no heartbeat for 10 min: its process is alive, so it may be stuck" in alive
    assert "no heartbeat for 10 min: its process is gone" in zimage(zhome, "runs", "show", "quiet-gone").stdout
