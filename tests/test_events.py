"""events.jsonl: one whole line per action from many writers, read into the registry's `events` table
incrementally, and restored exactly by `zimage registry rebuild` (real DuckDB file, real files)."""

from __future__ import annotations

import subprocess
import sys

from zimage.auth import Actor
from zimage.events import Event, home_events_path, read_events, record
from zimage.jobs import enqueue, rebuild
from zimage.registry.db import Registry
from zimage.registry.events import events, ingest_events, run_timeline
from zimage.registry.ingest import Ingester

WRITER = """
import sys
from pathlib import Path
from zimage.events import Event, record
from zimage.settings import Settings
settings = Settings(home=Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    record(settings, Event(sys.argv[2], "member", "run.stop", f"run:r{i}", detail="x" * 700))
"""


def test_concurrent_writers_never_mix_lines(zhome):
    """4 processes append 200 events each to the same file at once (plain interpreters, not multiprocessing:
    its spawned children re-run the parent's main module, which under pytest-xdist is not this test)."""
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(zhome.home), f"w{k}", "200"]) for k in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    lines = home_events_path(zhome).read_bytes().split(b"\n")[:-1]
    assert len(lines) == 800 and len(read_events(home_events_path(zhome))) == 800  # every line whole and valid
    assert sorted({e.user for e in read_events(home_events_path(zhome))}) == ["w0", "w1", "w2", "w3"]


def dump(reg):
    return reg.fetch("SELECT * FROM events ORDER BY line")


def test_events_are_ingested_bit_by_bit_and_a_rebuild_restores_them_exactly(zhome):
    alice = Actor("alice", "member", "ui")
    run_id = enqueue(zhome, "train", {"output_name": "cat"}, actor=alice)
    reg = Registry(zhome.db_path)
    try:
        ing = Ingester(reg, zhome)
        ing.scan()
        assert [tuple(r)[4:6] for r in dump(reg)] == [("train.launch", f"run:{run_id}")]
        path = home_events_path(zhome)
        with open(path, "ab") as fh:
            fh.write(b"not json\n")  # a damaged line is skipped and counted, never fatal
        record(zhome, Event("bob", "member", "run.stop", f"run:{run_id}", owner="alice", source="cli",
                            result="refused", detail="run is owned by alice"))  # fmt: skip
        with open(path, "ab") as fh:
            fh.write(b'{"time": 5, "user": "half')  # a writer mid-line: waits for its newline
        assert ingest_events(reg, zhome) == 1
        with open(path, "ab") as fh:
            fh.write(b'", "action": "login", "result": "done"}\n')
        assert ingest_events(reg, zhome) == 1 and ingest_events(reg, zhome) == 0
        before = dump(reg)
        assert [r[0] for r in before] == [0, 2, 3]  # line numbers of the file (line 1 is the damaged one)
        timeline = run_timeline(reg, run_id)
        assert list(timeline["user_name"]) == ["alice", "bob"] and list(timeline["result"]) == ["done", "refused"]
        assert list(events(reg, result="refused")["detail"]) == ["run is owned by alice"]
        assert len(events(reg, action="run.")) == 1
    finally:
        reg.close()
    counts = rebuild(zhome)
    assert counts["runs"] == 1
    reg = Registry(zhome.db_path)
    try:
        assert dump(reg) == before  # exactly the same rows, columns and values
    finally:
        reg.close()
