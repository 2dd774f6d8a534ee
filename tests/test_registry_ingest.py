"""Ingestion of run folders into registry.duckdb: offsets, half lines, bad lines, rebuild, migrations."""

import json
import logging
import os
import subprocess
import sys
import time

import duckdb
import pytest

from zimage.data.folders import DatasetFolder, DatasetInfo
from zimage.jobs import rebuild
from zimage.registry import RegistryError
from zimage.registry.db import Registry
from zimage.registry.ingest import Ingester
from zimage.registry.schema import SCHEMA_VERSION, TABLES
from zimage.runfolder import RunFolder


def make_run(settings, run_id, state="completed", user="ann", kind="train", config=None, steps=0):
    rf = RunFolder(settings.runs_dir / run_id)
    rf.write_config(config or {"dataset_path": "datasets/pets", "model_path": "tiny-zimage", "output_name": run_id})
    rf.update_status(state=state, kind=kind, user=user, name=run_id, created=1000.0, step=steps, total_steps=steps)
    for s in range(1, steps + 1):
        rf.append_metrics({"step": s, "loss": 1.0 / s, "lr": 1e-4})
    return rf


def append_raw(rf, text):
    with open(rf.metrics_path, "a", encoding="utf-8") as fh:
        fh.write(text)


@pytest.fixture()
def reg(zhome):
    registry = Registry(zhome.db_path)
    yield registry
    registry.close()


def dump(registry):
    """Every table's rows, sorted, for comparing two databases."""
    out = {}
    for table in TABLES:
        cols = [
            r[0]
            for r in registry.fetch(f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}'")
        ]
        out[table] = sorted(registry.fetch(f"SELECT * FROM {table}"), key=lambda r: tuple(str(v) for v in r))
        assert cols, table
    return out


def test_incremental_ingest_keeps_offsets_and_waits_for_a_half_line(zhome, reg):
    rf = make_run(zhome, "run-a", state="running", steps=3)
    append_raw(rf, '{"step": 4, "loss": 0.2')  # the worker is in the middle of writing this line
    ing = Ingester(reg, zhome)
    assert ing.ingest_run("run-a") == 3
    pos, lines = reg.fetch("SELECT pos, lines FROM ingest_files WHERE run_id = 'run-a' AND file = 'metrics'")[0]
    assert pos == len(rf.metrics_path.read_bytes()) - len('{"step": 4, "loss": 0.2') and lines == 3
    assert ing.ingest_run("run-a") == 0  # nothing new, nothing read twice
    append_raw(rf, '5, "lr": 0.001}\n{"step": 5, "loss": 0.1}\n')
    assert ing.ingest_run("run-a") == 2
    rows = reg.fetch("SELECT line, step, loss, lr FROM metrics WHERE run_id = 'run-a' ORDER BY line")
    assert [r[:2] for r in rows] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert rows[3][2:] == (0.25, 0.001)
    summary = reg.fetch(
        "SELECT metrics_rows, first_metric_step, last_metric_step, last_loss, state, user_name, dataset, model "
        "FROM runs WHERE run_id = 'run-a'"
    )[0]
    assert summary == (5, 1, 5, 0.1, "running", "ann", "pets", "tiny-zimage")
    # a new Ingester (the app restarted) continues from the stored offsets
    rf.append_metrics({"step": 6, "loss": 0.05})
    assert Ingester(reg, zhome).ingest_run("run-a") == 1
    assert reg.fetch("SELECT count(*), max(line) FROM metrics")[0] == (6, 5)


def test_garbage_lines_are_counted_logged_and_skipped(zhome, reg, caplog):
    rf = make_run(zhome, "run-g", steps=2)
    append_raw(
        rf,
        "this is not json\n"
        '{"loss": 0.5}\n'  # no step
        '{"step": "three", "loss": 0.5}\n'
        "[1, 2, 3]\n"
        '{"step": 3, "loss": "high"}\n'
        '{"step": 4, "lo\n'  # a line cut short by a crash
        "\n"
        '{"step": 5, "loss": 0.2, "unknown_key": "ignored"}\n'
        '{"step": 6.0, "loss": 1}\n',
    )
    with caplog.at_level(logging.WARNING, logger="zimage.registry"):
        Ingester(reg, zhome).ingest_run("run-g")
    assert reg.fetch("SELECT step FROM metrics ORDER BY line") == [(1,), (2,), (5,), (6,)]
    assert reg.fetch("SELECT malformed_lines, metrics_rows, last_loss FROM runs")[0] == (6, 4, 1.0)
    assert reg.fetch("SELECT malformed, lines FROM ingest_files WHERE file = 'metrics'")[0] == (6, 10)
    assert any("run-g: metrics.jsonl has 6 malformed line(s)" in r.getMessage() for r in caplog.records)
    # lines are numbered among non-blank lines, whichever parser read them
    assert reg.fetch("SELECT line FROM metrics ORDER BY line") == [(0,), (1,), (8,), (9,)]


def test_a_shrunk_or_replaced_file_is_read_again(zhome, reg):
    rf = make_run(zhome, "run-r", steps=5)
    ing = Ingester(reg, zhome)
    ing.ingest_run("run-r")
    # a resumed trainer rewrites its metrics up to its checkpoint (a new file, renamed over the old)
    tmp = rf.path / "metrics.tmp"
    tmp.write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2)))
    os.replace(tmp, rf.metrics_path)
    ing.ingest_run("run-r")
    assert reg.fetch("SELECT step, loss FROM metrics ORDER BY line") == [(1, 9.0), (2, 9.0)]
    assert reg.fetch("SELECT metrics_rows, last_metric_step FROM runs")[0] == (2, 2)


def test_samples_checkpoints_datasets_and_deleted_runs(zhome, reg):
    rf = make_run(zhome, "run-s", steps=1)
    rf.append_sample({"step": 10, "prompt": "a cat", "seed": 1, "path": "samples/10.png", "cfg": 1.0})
    rf.append_sample({"step": 20, "prompt": "a dog", "seed": 2, "path": "samples/20.png"})
    with open(rf.samples_path, "a") as fh:
        fh.write('{"step": 30}\n')  # no path: malformed
    for name in ("step-000010", "step-000020", ".tmp-step-000030"):
        (rf.checkpoints_dir / name).mkdir(parents=True)
        (rf.checkpoints_dir / name / "lora.safetensors").write_bytes(b"x" * 100)
    ds = DatasetFolder(zhome.datasets_dir / "pets")
    ds.images_dir.mkdir(parents=True)
    for stem in ("a", "b"):
        (ds.images_dir / f"{stem}.png").write_bytes(b"png")
    (ds.images_dir / "a.txt").write_text("a cat")
    ds.write_info(DatasetInfo(name="pets", type="concept", trigger_word="zpet", resolution=512))
    ing = Ingester(reg, zhome)
    ing.scan()
    assert reg.fetch("SELECT step, prompt, seed, path, extra FROM samples ORDER BY line") == [
        (10, "a cat", 1, "samples/10.png", '{"cfg": 1.0}'),
        (20, "a dog", 2, "samples/20.png", None),
    ]
    assert reg.fetch("SELECT name, step, path, size FROM checkpoints ORDER BY step") == [
        ("step-000010", 10, "checkpoints/step-000010", 100),
        ("step-000020", 20, "checkpoints/step-000020", 100),
    ]
    assert reg.fetch("SELECT samples_count, checkpoints_count, malformed_lines, last_sample_path FROM runs")[0] == (
        2, 2, 1, "samples/20.png",
    )  # fmt: skip
    assert reg.fetch("SELECT name, type, trigger_word, num_images, captioned, resolution FROM datasets") == [
        ("pets", "concept", "zpet", 2, 1, 512)
    ]
    # the folders go away: so do their rows
    import shutil

    shutil.rmtree(rf.path)
    shutil.rmtree(ds.path)
    ing.scan()
    for table in ("runs", "metrics", "samples", "checkpoints", "ingest_files", "datasets"):
        assert reg.fetch(f"SELECT count(*) FROM {table}") == [(0,)], table


def test_delete_the_database_and_rebuild_gives_the_same_rows(zhome):
    """Acceptance: rows ingested bit by bit (half lines, garbage, resumes) equal a rebuild from scratch."""
    reg = Registry(zhome.db_path)
    ing = Ingester(reg, zhome)
    live = make_run(zhome, "run-live", state="running", steps=0)
    make_run(zhome, "run-done", steps=40)
    make_run(zhome, "run-cap", kind="caption", user="bob", config={"dataset": "pets", "model": "blip"})
    for s in range(1, 30):
        live.append_metrics({"step": s, "loss": 1 / s, "grad_norm": s * 0.1})
        if s % 7 == 0:
            append_raw(live, "garbage\n")
        if s % 5 == 0:
            append_raw(live, '{"step": 999, "lo')  # half a line, completed below
            ing.scan()
            append_raw(live, 'ss": 0.5}\n')
        if s % 10 == 0:
            live.append_sample({"step": s, "prompt": "p", "seed": s, "path": f"samples/{s}.png"})
            live.update_status(step=s)
            ing.scan()
    ing.scan()
    before = dump(reg)
    # Each step-999 line is followed by lower steps, as after a resume: the later lines void it (live, when
    # the 999 row was already stored, and in the rebuild's single pass alike).
    assert len(before["metrics"]) == 40 + 29 and len(before["runs"]) == 3
    reg.close()

    zhome.db_path.unlink()
    counts = rebuild(zhome)
    assert counts["runs"] == 3 and counts["metrics"] == 69 and counts["by"] == "this process"
    reg = Registry(zhome.db_path)
    try:
        assert dump(reg) == before
    finally:
        reg.close()


def test_migrations_bring_an_old_database_up_and_refuse_a_newer_one(zhome):
    reg = Registry(zhome.db_path)
    reg.close()
    con = duckdb.connect(str(zhome.db_path))
    con.execute("DROP VIEW jobs")  # what versions 2 to 6 added
    con.execute("DROP TABLE events")
    con.execute("ALTER TABLE metrics DROP COLUMN val_loss")
    con.execute("ALTER TABLE checkpoints DROP COLUMN val_loss")
    con.execute("ALTER TABLE datasets DROP COLUMN problem")
    con.execute("ALTER TABLE runs DROP COLUMN problem")
    con.execute("ALTER TABLE checkpoints DROP COLUMN problem")
    con.execute("UPDATE schema_meta SET value = '1'")
    con.close()
    reg = Registry(zhome.db_path)
    assert reg.fetch("SELECT value FROM schema_meta")[0][0] == str(SCHEMA_VERSION) and SCHEMA_VERSION >= 5
    assert reg.fetch("SELECT count(val_loss) FROM metrics") == [(0,)]
    assert reg.fetch("SELECT count(*) FROM events") == [(0,)]
    assert reg.fetch("SELECT count(*) FROM jobs") == [(0,)]
    assert reg.fetch("SELECT count(problem) FROM datasets") == [(0,)]
    assert reg.fetch("SELECT count(problem) FROM runs") == reg.fetch("SELECT count(problem) FROM checkpoints") == [(0,)]
    reg.close()
    con = duckdb.connect(str(zhome.db_path))
    con.execute("UPDATE schema_meta SET value = '99'")
    con.close()
    with pytest.raises(RegistryError, match="schema version 99 was written by a newer zimage"):
        Registry(zhome.db_path)


def test_a_database_held_by_another_program_is_a_clear_error(zhome):
    Registry(zhome.db_path).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(zhome.db_path)!r}); print('ok', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(RegistryError, match="the registry is open in another program"):
            Registry(zhome.db_path)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    Registry(zhome.db_path).close()


def test_fast_and_slow_parsers_number_lines_alike():
    from zimage.registry.jsonl import parse_metrics

    clean = b'{"step": 1, "loss": 1}\n\n{"loss": 2}\n{"step": 3, "loss": 3, "extra": [1]}\n'
    fast = parse_metrics(clean, 10)  # pyarrow reads it whole; the step-less line is dropped and counted
    slow = parse_metrics(clean + b"garbage\n", 10)  # a bad line sends it line by line
    for chunk, malformed, lines in ((fast, 1, 3), (slow, 2, 4)):
        assert chunk.table.column("line").to_pylist() == [10, 12]
        assert chunk.table.column("step").to_pylist() == [1, 3] and chunk.table.column("loss").to_pylist() == [1.0, 3.0]
        assert (chunk.malformed, chunk.lines) == (malformed, lines)
    assert slow.bad_examples == ['{"loss": 2}', "garbage"]


def test_a_resumed_run_keeps_the_later_line_for_each_step_live_and_rebuilt(zhome, tmp_path):
    """A kill after step 7 and a resume from step 4 log steps 5-7 twice; only the resumed lines count, and a
    second resume from step 2 that stops at step 4 voids the first attempt's 5-9 as well."""
    from zimage.registry.ingest import rebuild_into

    reg = Registry(zhome.db_path)
    ing = Ingester(reg, zhome)
    rf = make_run(zhome, "run-r", state="running", steps=0)

    def log(steps, loss):
        for s in steps:
            rf.append_metrics({"step": s, "loss": loss, "lr": 1e-4})

    def stored():
        return reg.fetch("SELECT step, loss FROM metrics WHERE run_id = 'run-r' ORDER BY step")

    def summary():
        q = "SELECT metrics_rows, first_metric_step, last_metric_step, last_loss FROM runs WHERE run_id = 'run-r'"
        return reg.fetch(q)[0]

    log(range(1, 8), 1.0)
    ing.ingest_run("run-r")
    log(range(5, 10), 2.0)  # resumed from the checkpoint at step 4
    ing.ingest_run("run-r")
    assert stored() == [(s, 1.0) for s in range(1, 5)] + [(s, 2.0) for s in range(5, 10)]
    assert summary() == (9, 1, 9, 2.0)

    log([3, 4], 3.0)  # resumed again, from step 2, and stopped at step 4
    ing.ingest_run("run-r")
    assert stored() == [(1, 1.0), (2, 1.0), (3, 3.0), (4, 3.0)]
    assert summary() == (4, 1, 4, 3.0)
    live = dump(reg)
    reg.close()

    # The whole file read in one pass (a rebuild) gives the same rows.
    rebuilt_file = tmp_path / "rebuilt.duckdb"
    rebuild_into(rebuilt_file, zhome)
    rebuilt = Registry(rebuilt_file)
    try:
        again = dump(rebuilt)
    finally:
        rebuilt.close()
    assert again["metrics"] == live["metrics"] and again["runs"] == live["runs"]


def test_superseded_rows_within_one_chunk():
    import pyarrow as pa

    from zimage.registry.jsonl import drop_superseded

    table = pa.table({"line": list(range(8)), "step": [1, 2, 3, 4, 2, 3, 5, 5]})
    assert drop_superseded(table).to_pydict() == {"line": [0, 4, 5, 7], "step": [1, 2, 3, 5]}
    ordered = pa.table({"line": [0, 1, 2], "step": [1, 2, 10]})
    assert drop_superseded(ordered) is ordered  # the common case is returned untouched


@pytest.mark.parametrize(
    ("damage", "problem", "kind"),
    [
        ('{"state": "running", "pid": "abc", "kind": "train", "user": "ann"}',
         "status.json: pid must be a whole number, got 'abc'", "train"),  # the sound fields are kept
        ('["queued"]', "status.json: must hold a JSON object, found list", None),
        ("folder", "status.json: is a folder, not a file", None),
        ('{"state": "running", "heartbeat": NaN}', "status.json: not valid JSON", None),
    ],
)  # fmt: skip
def test_a_damaged_status_gives_a_damaged_row_and_leaves_the_others_alone(zhome, reg, damage, problem, kind):
    make_run(zhome, "run-good", steps=2)
    bad = make_run(zhome, "run-bad", steps=2)
    ing = Ingester(reg, zhome)
    ing.scan()
    bad.status_path.unlink()
    if damage == "folder":
        bad.status_path.mkdir()
    else:
        bad.status_path.write_text(damage)
    ing.scan()
    rows = {r[0]: r[1:] for r in reg.fetch("SELECT run_id, state, problem, kind, metrics_rows FROM runs")}
    assert rows["run-good"] == ("completed", None, "train", 2)
    state, got, got_kind, metrics = rows["run-bad"]
    assert (state, got_kind, metrics) == ("damaged", kind, 2) and got.startswith(problem), got
    counts = rebuild(zhome)  # a rebuild indexes it the same way
    assert counts["runs"] == 2


def test_a_damaged_config_or_progress_is_named_and_the_run_keeps_its_state(zhome, reg):
    rf = make_run(zhome, "run-c", state="running", steps=1)
    rf.config_path.write_text('{"dataset_path": "pets",')
    for name, progress in (("step-000001", '{"step": 1, "complete": true}'), ("step-000002", '{"step": "two"}'),
                           ("step-000003", None), ("step-000004", '{"step": 4}')):  # fmt: skip
        folder = rf.checkpoints_dir / name
        folder.mkdir(parents=True)
        if progress is not None:
            (folder / "progress.json").write_text(progress)
    Ingester(reg, zhome).ingest_run("run-c")
    state, problem = reg.fetch("SELECT state, problem FROM runs")[0]
    assert state == "running" and problem.startswith("config.json: not valid JSON")
    assert reg.fetch("SELECT name, problem FROM checkpoints ORDER BY name") == [
        ("step-000001", None),
        ("step-000002", "progress.json: step must be a whole number, got 'two'"),
        ("step-000003", "progress.json: missing"),
        ("step-000004", "progress.json: not marked complete"),
    ]


def test_sample_lines_follow_their_schema():
    from zimage.registry.jsonl import parse_samples

    data = (
        b'{"step": 1, "path": "samples/a.png", "prompt": "a cat", "seed": 3, "index": 0}\n'
        b'{"step": 2, "path": "samples/b.png"}\n'
        b'{"step": 3, "path": 7}\n'  # a path must be text
        b'{"step": 4, "path": "samples/c.png", "seed": 99999999999999999999}\n'  # no BIGINT holds it
        b'{"step": 5, "path": "samples/d.png", "prompt": ["x"]}\n'
        b'{"step": 6, "path": "samp'
    )
    chunk = parse_samples(data[: data.rfind(b"\n") + 1], 0)
    assert [(r["step"], r["seed"], r["prompt"], r["extra"]) for r in chunk.rows] == [
        (1, 3, "a cat", '{"index": 0}'),
        (2, None, None, None),
    ]
    assert (chunk.lines, chunk.malformed) == (5, 3)
