"""Queue priorities and the per-user limit, with the real scheduler and detached workers.

The slots come from settings.toml (`[scheduler] gpus = "0,1,2"`, `user_limit = 2`; on a CPU host the ids
are only labels). The workers are tests/support_worker.py (through its test-local `install`), so no trainer
runs: each job runs until a stop request reaches it.
"""

import argparse
import time

import pytest
import support_worker
from test_jobs_scheduler import status, wait_for  # the scheduler tests' helpers

from zimage import registry as R
from zimage.cli.queue import run_show
from zimage.jobs import JobError, control, enqueue, move_up
from zimage.jobs.queue import queued_runs
from zimage.jobs.scheduler import Scheduler
from zimage.runfolder import ACTIVE_STATES, RunFolder
from zimage.settings import SettingsFileError
from zimage.views import home as home_view

FAST = {"tick": 0.1, "rescan": 1.0}
LONG = {"steps": 100000, "interval": 0.05}  # runs until it is stopped


def states(settings, ids):
    return [status(settings, r).get("state") for r in ids]


@pytest.fixture()
def host(zhome, monkeypatch):
    """A home whose settings.toml offers `gpus` slots; returns a function that writes it and starts a scheduler."""
    monkeypatch.delenv("ZIMAGE_GPUS", raising=False)
    monkeypatch.delenv("ZIMAGE_JOBS_PER_GPU", raising=False)
    support_worker.install(monkeypatch)
    started = []

    def _start(gpus: str, user_limit: int = 0) -> Scheduler:
        zhome.settings_path.write_text(f'[scheduler]\ngpus = "{gpus}"\nuser_limit = {user_limit}\n')
        sched = Scheduler(zhome, **FAST).start()  # slots and the limit from settings.toml
        assert sched.ready.wait(15) and sched.scanned.wait(15), sched.status()
        started.append(sched)
        return sched

    yield _start
    for sched in started:
        sched.stop()
    live = [RunFolder(p) for p in zhome.runs_dir.iterdir() if RunFolder(p).read_status().get("state") in ACTIVE_STATES]
    for folder in live:
        folder.send_control("stop")  # no worker outlives its test
    wait_for(lambda: not any(f.read_status().get("state") in ACTIVE_STATES for f in live), 20, "the workers to stop")


def active(settings, ids):
    return [r for r in ids if status(settings, r).get("state") in ("starting", "running")]


def test_user_limit_two_of_three_start_the_third_says_why_and_starts_when_one_ends(zhome, host, capsys):
    ann = [enqueue(zhome, support_worker.KIND, LONG, user="ann", name=f"ann-{i}") for i in range(3)]
    sched = host("0,1,2", user_limit=2)
    assert sched.slots.capacity == 3
    wait_for(lambda: len(active(zhome, ann)) == 2, 30, "two of ann's runs started")
    third = ann[2]
    wait_for(lambda: status(zhome, third).get("waiting") == "user limit 2 reached", 10, "the reason in status.json")
    time.sleep(1.0)  # ten ticks: the free slot stays free, the limit holds
    assert active(zhome, ann) == ann[:2] and status(zhome, third)["state"] == "queued"

    # The queue panel and `zimage queue` show it.
    rows = wait_for(
        lambda: [r for r in home_view.queue_rows(R.queue(sched.registry)) if r["run"] == third and r["waiting"]],
        10,
        "the reason in the registry",
    )
    assert rows[0]["waiting"] == "user limit 2 reached" and rows[0]["position"] == "1"
    run_show(argparse.Namespace())
    line = next(ln for ln in capsys.readouterr().out.splitlines() if third in ln)
    assert "queued" in line and "user limit 2 reached" in line

    # Another user's job takes the free third slot meanwhile.
    bob = enqueue(zhome, support_worker.KIND, LONG, user="bob", name="bob")
    wait_for(lambda: status(zhome, bob).get("state") in ("starting", "running"), 30, "bob's run started")
    assert status(zhome, third)["state"] == "queued"

    # One of ann's runs ends: her third one starts (ann is under her limit, and a slot is free).
    control(zhome, ann[0], "stop")
    wait_for(lambda: status(zhome, ann[0]).get("state") == "stopped", 30, "the first run stopped")
    wait_for(lambda: status(zhome, third).get("state") in ("starting", "running"), 30, "the third run started")
    assert "waiting" not in status(zhome, third) or status(zhome, third)["waiting"] is None


def test_a_high_priority_job_queued_last_starts_before_normal_ones(zhome, host):
    sched = host("0")
    blocker = enqueue(zhome, support_worker.KIND, LONG, name="blocker")
    wait_for(lambda: status(zhome, blocker).get("state") == "running", 30, "the blocker running")
    normal = [enqueue(zhome, support_worker.KIND, LONG, name=f"normal-{i}") for i in range(2)]
    low = enqueue(zhome, support_worker.KIND, LONG, name="low", priority="low")
    high = enqueue(zhome, support_worker.KIND, LONG, name="high", priority="high")
    assert status(zhome, high)["priority"] == "high" and status(zhome, normal[0])["priority"] == "normal"
    assert [rid for rid, _ in queued_runs(zhome)] == [high, *normal, low]
    expected = {high: "waiting for a GPU", normal[0]: "behind 1 job", normal[1]: "behind 2 jobs", low: "behind 3 jobs"}
    wait_for(lambda: {r: status(zhome, r).get("waiting") for r in expected} == expected, 10, "the reasons")

    def line():
        q = R.queue(sched.registry)
        return q[q["state"] == "queued"].sort_values("position")["run_id"].tolist()

    wait_for(lambda: line() == [high, *normal, low], 10, "the registry's line")
    assert move_up(zhome, normal[0]) == 1  # a normal job does not pass the high one
    assert move_up(zhome, low) == 3  # nor a low one the normal ones
    assert [rid for rid, _ in queued_runs(zhome)] == [high, *normal, low]

    control(zhome, blocker, "stop")
    wait_for(lambda: status(zhome, high).get("state") in ("starting", "running"), 30, "the high job started")
    assert states(zhome, [*normal, low]) == ["queued", "queued", "queued"]
    wait_for(lambda: status(zhome, normal[0]).get("waiting") == "waiting for a GPU", 10, "the new head's reason")


def test_priority_is_checked_and_defaults_from_settings(zhome):
    with pytest.raises(JobError, match=r"priority: 'urgent' is not a priority; allowed: high, normal, low"):
        enqueue(zhome, "train", {"output_name": "x"}, priority="urgent")
    assert not any(zhome.runs_dir.iterdir())  # nothing half-queued
    run_id = enqueue(zhome, "train", {"output_name": "x"})
    assert status(zhome, run_id)["priority"] == "normal"
    zhome.settings_path.write_text('[scheduler]\ndefault_priority = "low"\n')
    assert status(zhome, enqueue(zhome, "train", {"output_name": "x"}))["priority"] == "low"
    zhome.settings_path.write_text('[scheduler]\ndefault_priority = "urgent"\nuser_limit = -1\n')
    with pytest.raises(SettingsFileError, match=r"scheduler\.default_priority.*scheduler\.user_limit"):
        enqueue(zhome, "train", {"output_name": "x"})
