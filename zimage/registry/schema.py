"""The registry's tables and their migrations.

`schema_meta.schema_version` says which migrations a database has had; `migrate` applies the missing
ones in order, each in its own transaction. A database written by a newer zimage is refused (not
downgraded). The registry is an index of the run folders, so `zimage registry rebuild` is always a way
out, but a migration keeps a big registry usable without re-reading every metrics file.

Tables (times are Unix seconds, as in status.json):
    datasets     one row per datasets/<name>/dataset.json, with image and caption counts
    runs         one row per job folder of any kind (train, caption, testgrid): what status.json
                 and config.json say, plus a summary of its metrics (kept here so the runs list never
                 aggregates the metrics table)
    metrics      one row per metrics.jsonl line: (run_id, line) + the DESIGN.md metric fields
    samples      one row per samples.jsonl line
    checkpoints  one row per entry of a run's checkpoints/ folder
    events       one row per line of the home's events.jsonl: who did what to which run or dataset
    ingest_files how far each append-only file has been read (byte offset, lines, malformed lines)
    jobs (view)  the runs that are not training runs
"""

from __future__ import annotations

from zimage.errors import UserError
from zimage.run_records import METRIC_FIELDS

METRIC_COLUMNS = METRIC_FIELDS[1:]  # every field but `step` is a DOUBLE column
# The metric columns the first schema had; later ones come by migration (v5: val_loss).
_V1_METRIC_COLUMNS = ("loss", "lr", "grad_norm", "step_time", "samples_per_s", "mem_allocated", "mem_peak", "elapsed",
                      "eta")  # fmt: skip

_V1 = [
    "CREATE TABLE IF NOT EXISTS schema_meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE datasets (
        name VARCHAR PRIMARY KEY, type VARCHAR, trigger_word VARCHAR, description VARCHAR,
        resolution INTEGER, num_images INTEGER, captioned INTEGER, created VARCHAR, path VARCHAR,
        updated DOUBLE)""",
    """CREATE TABLE runs (
        run_id VARCHAR PRIMARY KEY, kind VARCHAR, name VARCHAR, user_name VARCHAR, state VARCHAR,
        dataset VARCHAR, model VARCHAR, output_name VARCHAR, config VARCHAR, status VARCHAR,
        gpus INTEGER, gpu_ids VARCHAR, host VARCHAR, pid BIGINT, pid_start_time DOUBLE,
        created DOUBLE, started DOUBLE, ended DOUBLE, heartbeat DOUBLE, last_heartbeat DOUBLE,
        step BIGINT, total_steps BIGINT, queue_order DOUBLE, cancelled BOOLEAN, resumes INTEGER,
        error VARCHAR, output_path VARCHAR,
        metrics_rows BIGINT, first_metric_step BIGINT, last_metric_step BIGINT, last_loss DOUBLE,
        last_lr DOUBLE, last_step_time DOUBLE, eta DOUBLE, malformed_lines BIGINT,
        samples_count BIGINT, last_sample_path VARCHAR, checkpoints_count BIGINT)""",
    # run_time: the run id's YYYYMMDDHHMMSS as a number (0 if it has none). DuckDB keeps min/max per row
    # group for numbers, but only an 8-byte prefix for strings, which all ids of one day share; filtering
    # on run_time too lets a series query skip the row groups of other runs (50 -> 2 at 5 M rows).
    "CREATE TABLE metrics (run_id VARCHAR, run_time BIGINT, line BIGINT, step BIGINT, "
    + ", ".join(f"{c} DOUBLE" for c in _V1_METRIC_COLUMNS)
    + ")",
    """CREATE TABLE samples (
        run_id VARCHAR, line BIGINT, step BIGINT, prompt VARCHAR, seed BIGINT, path VARCHAR, extra VARCHAR)""",
    """CREATE TABLE checkpoints (
        run_id VARCHAR, name VARCHAR, step BIGINT, path VARCHAR, size BIGINT, mtime DOUBLE)""",
    """CREATE TABLE ingest_files (
        run_id VARCHAR, file VARCHAR, pos BIGINT, lines BIGINT, malformed BIGINT, ino BIGINT,
        PRIMARY KEY (run_id, file))""",
]

# v2: the page helpers that came after the first tables.
_V2 = [
    "CREATE OR REPLACE VIEW jobs AS SELECT * FROM runs WHERE kind <> 'train'",
]

# v3: a dataset (or run) whose file is damaged is listed with the reason instead of being dropped.
_V3 = [
    "ALTER TABLE datasets ADD COLUMN problem VARCHAR",
]

# v4: a run whose status.json or config.json is damaged (state `damaged` for status.json) carries the reason,
# and so does a checkpoint whose progress.json is missing, damaged or not marked complete. The jobs view is
# made again: its `SELECT *` was bound to the columns runs had before.
_V4 = [
    "ALTER TABLE runs ADD COLUMN problem VARCHAR",
    "ALTER TABLE checkpoints ADD COLUMN problem VARCHAR",
    "CREATE OR REPLACE VIEW jobs AS SELECT * FROM runs WHERE kind <> 'train'",
]

# v5: the validation loss of a step (issue 13), after the other metric columns (inserts go by position).
_V5 = [
    "ALTER TABLE metrics ADD COLUMN val_loss DOUBLE",
    "ALTER TABLE checkpoints ADD COLUMN val_loss DOUBLE",  # what the checkpoint's progress.json recorded
]

# v6: the record of every action (issue 18): one row per line of the home's events.jsonl (zimage.events).
_V6 = [
    """CREATE TABLE IF NOT EXISTS events (
        line BIGINT PRIMARY KEY, time DOUBLE, user_name VARCHAR, role VARCHAR, action VARCHAR, target VARCHAR,
        owner VARCHAR, source VARCHAR, result VARCHAR, detail VARCHAR, as_admin BOOLEAN)""",
]

MIGRATIONS: list[tuple[int, list[str]]] = [(1, _V1), (2, _V2), (3, _V3), (4, _V4), (5, _V5), (6, _V6)]
SCHEMA_VERSION = MIGRATIONS[-1][0]
TABLES = ("datasets", "runs", "metrics", "samples", "checkpoints", "events")  # the content `rebuild` reproduces


class RegistryError(UserError):
    """The registry database cannot be used as it is (newer schema, held by another program)."""


def schema_version(con) -> int:
    has_meta = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_meta'"
    ).fetchone()[0]
    if not has_meta:
        return 0
    row = con.execute("SELECT value FROM schema_meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(con, path: str = "registry") -> int:
    """Bring the database to SCHEMA_VERSION; returns the version it had before."""
    before = schema_version(con)
    if before > SCHEMA_VERSION:
        raise RegistryError(
            f"{path}: schema version {before} was written by a newer zimage (this one knows {SCHEMA_VERSION}); "
            "upgrade zimage, or move the file away and run `zimage registry rebuild`"
        )
    for version, statements in MIGRATIONS:
        if version <= before:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for sql in statements:
                con.execute(sql)
            con.execute(
                "INSERT INTO schema_meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [str(version)],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return before
