"""Acceptance: 4 real workers append 20,000 metric lines each while 8 threads poll the page queries.

The workers are tests/support_worker.py (a real run_job worker writing metrics at a set rate: no real kind
writes 80,000 lines in seconds), launched by this process's scheduler through the test-local hook."""

import os
import random
import signal
import threading
import time

import pytest
import support_worker

from zimage import registry as R
from zimage.jobs import enqueue, registry_for
from zimage.jobs.launcher import process_alive
from zimage.jobs.scheduler import ensure_scheduler, stop_all
from zimage.jobs.slots import SlotConfig
from zimage.runfolder import RunFolder

LINES = 20_000
POLL_SECONDS = 30


@pytest.mark.slow
def test_four_writers_and_eight_readers(zhome, monkeypatch):
    support_worker.install(monkeypatch)
    ids = [
        enqueue(
            zhome,
            support_worker.KIND,
            {"steps": LINES, "lines_per_tick": 25, "interval": 0.03, "status_every": 0.5},
            user=f"user{i % 2}",
            name=f"writer{i}",
        )  # fmt: skip
        for i in range(4)
    ]
    sched = ensure_scheduler(zhome, slots=SlotConfig(("0", "1", "2", "3")), tick=0.5, rescan=3.0)
    reg = registry_for(zhome)
    errors: list[BaseException] = []
    counts = [0] * 8
    stop_at = time.monotonic() + POLL_SECONDS

    def poll(n: int) -> None:
        rng = random.Random(n)
        while time.monotonic() < stop_at:
            try:
                run_id = rng.choice(ids)
                R.list_runs(reg)
                R.list_runs(reg, state="running", user="user1", text="writer")
                series = R.metric_series(reg, run_id, ["loss", "lr"], max_points=300)
                assert (series.groupby("metric").size() <= 300).all()
                R.samples(reg, run_id)
                R.queue(reg)
                R.run_detail(reg, run_id)
                R.config_diff(reg, ids[:2])
                counts[n] += 1
            except BaseException as exc:  # noqa: BLE001 - every failure is reported below
                errors.append(exc)
                return

    try:
        threads = [threading.Thread(target=poll, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        assert all(c > 0 for c in counts) and sum(counts) >= 50, counts

        def done() -> bool:
            states = [RunFolder(zhome.runs_dir / r).read_status().get("state") for r in ids]
            return states == ["completed"] * 4

        deadline = time.monotonic() + 60
        while not done() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done(), "the writers did not finish"
        deadline = time.monotonic() + 20
        reg = sched.registry
        while reg.fetch("SELECT count(*) FROM metrics")[0][0] < 4 * LINES and time.monotonic() < deadline:
            time.sleep(0.2)
        assert reg.fetch("SELECT count(*), count(DISTINCT (run_id, line)) FROM metrics") == [(4 * LINES, 4 * LINES)]
        per_run = dict(reg.fetch("SELECT run_id, count(*) FROM metrics GROUP BY run_id"))
        assert per_run == dict.fromkeys(ids, LINES)
        summary = reg.fetch("SELECT sum(metrics_rows), max(last_metric_step), sum(malformed_lines) FROM runs")[0]
        assert summary == (4 * LINES, LINES, 0)
        assert sorted(RunFolder(zhome.runs_dir / r).read_status()["cuda_visible_devices"] for r in ids) == [
            "0",
            "1",
            "2",
            "3",
        ]
    finally:
        stop_all()
        for r in ids:
            st = RunFolder(zhome.runs_dir / r).read_status()
            if st.get("pid") and process_alive(st["pid"], st.get("pid_start_time")):
                os.kill(st["pid"], signal.SIGKILL)
