"""registry.duckdb deleted under a running app is noticed and rebuilt from the folders within a tick."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from zimage import registry as R
from zimage.jobs.scheduler import Scheduler
from zimage.jobs.slots import SlotConfig


def _finished_run(runs_dir: Path, run_id: str, steps: int) -> None:
    folder = runs_dir / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"output_name": run_id, "num_steps": steps}))
    status = {"state": "completed", "kind": "train", "step": steps, "total_steps": steps, "ended": time.time()}
    (folder / "status.json").write_text(json.dumps(status))
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4}) for s in range(1, steps + 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_deleted_registry_is_rebuilt_with_a_log_line(zhome, caplog):
    _finished_run(zhome.runs_dir, "20261203-000000-first", 30)
    sched = Scheduler(zhome, slots=SlotConfig(()), launch_jobs=False, tick=0.2, rescan=60, watch=False).start()
    try:
        assert sched.scanned.wait(30)
        assert R.metric_series(sched.registry, "20261203-000000-first", ["loss"]).shape[0] == 30
        _finished_run(zhome.runs_dir, "20261203-000001-second", 5)  # not yet seen: no rescan for 60 s
        with caplog.at_level(logging.WARNING, logger="zimage.jobs"):
            zhome.db_path.unlink()
            Path(str(zhome.db_path) + ".wal").unlink(missing_ok=True)
            _wait(lambda: "registry recreated" in caplog.text, 10, "the rebuild")
        assert zhome.db_path.is_file()
        assert "was deleted while in use; rebuilding it from the run folders" in caplog.text
        runs = set(R.list_runs(sched.registry)["run_id"])
        assert runs == {"20261203-000000-first", "20261203-000001-second"}
        assert R.metric_series(sched.registry, "20261203-000000-first", ["loss"]).shape[0] == 30
    finally:
        sched.stop()
