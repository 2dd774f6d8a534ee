"""Incremental ingestion of run folders (and dataset folders) into the registry.

The folders are the truth; this keeps the index close behind them. For each run it remembers the stat
signature of status.json / config.json / checkpoints/, and for the append-only metrics.jsonl and
samples.jsonl a byte offset and line count (stored in `ingest_files`, in the same transaction as the
rows, so a crash never ingests a line twice or skips one). A file that shrank or was replaced (new
inode) is read again from the start. A half-written last line waits for the next pass; malformed lines
are counted and logged, never fatal. One run's problem (unreadable file) never stops the others: a
damaged status.json gives the run state `damaged` with the reason in `problem` (a damaged config.json
only the reason), read through zimage.run_records like every other run-folder file.

Callers: the scheduler (watchdog events + periodic rescan), `refresh_run` after a button press, and
`rebuild`, which runs `scan()` into an empty database.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from zimage.data.folders import DatasetFolder, list_datasets
from zimage.records import Damaged
from zimage.registry.db import Registry
from zimage.registry.events import ingest_events
from zimage.registry.jsonl import Chunk, drop_superseded, parse_metrics, parse_samples, read_new_bytes
from zimage.registry.rows import (
    RUN_COLUMNS,
    apply_config,
    apply_metrics,
    apply_status,
    list_checkpoints,
    run_time_of,
    to_int,
    to_str,
)
from zimage.registry.schema import METRIC_COLUMNS
from zimage.run_records import DAMAGED, read_config, read_status, salvage_status, status_fields
from zimage.settings import Settings

log = logging.getLogger("zimage.registry")

_UPSERT_RUN = (
    f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))}) "
    f"ON CONFLICT (run_id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in RUN_COLUMNS[1:])}"
)
_METRIC_SELECT = ", ".join(["line", "step", *METRIC_COLUMNS])


def _sig(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_mtime_ns, st.st_size)


PREFETCH = 3  # folders read ahead of the inserts during a scan
BATCH_ROWS = 200_000  # metric rows per transaction during a scan


@dataclass
class _Pending:
    """One run's changes, read from its folder and waiting to be written."""

    run_id: str
    base: tuple  # (runs row, metrics offset record, samples offset record, stat signatures) read from
    sigs: dict
    row: dict
    changed: bool = False
    checkpoints: list | None = None
    metrics: Chunk | None = None
    m_rec: dict | None = None
    m_reset: bool = False
    m_redo_from: int | None = None  # a resumed run logs steps again: stored rows from this step on are void
    samples: Chunk | None = None
    s_rec: dict | None = None
    s_reset: bool = False

    @property
    def rows(self) -> int:
        table = self.metrics.table if self.metrics is not None else None
        return table.num_rows if table is not None else 0


class Ingester:
    """Keeps one Registry up to date with the folders under one Settings home."""

    def __init__(self, registry: Registry, settings: Settings):
        self.reg = registry
        self.settings = settings
        self._sigs: dict[str, dict[str, tuple | None]] = {}  # run_id -> file -> stat signature
        self._dataset_sigs: dict[str, tuple] = {}
        self.load()

    def load(self) -> None:
        """(Re)read what the database already holds, e.g. after the app restarts or a rebuild."""
        with self.reg.write_lock, self.reg.read() as cur:
            cols = [d[0] for d in cur.execute("SELECT * FROM runs LIMIT 0").description]
            self.runs = {r[0]: dict(zip(cols, r, strict=True)) for r in cur.execute("SELECT * FROM runs").fetchall()}
            self.files = {
                (r[0], r[1]): {"pos": r[2], "lines": r[3], "malformed": r[4], "ino": r[5]}
                for r in cur.execute("SELECT run_id, file, pos, lines, malformed, ino FROM ingest_files").fetchall()
            }
        self._sigs = {}
        self._dataset_sigs = {}

    # -- whole home ---------------------------------------------------------------------------------
    def scan(self) -> int:
        """Ingest every run folder and dataset; drop runs whose folder is gone. Returns new metric rows.

        Reading and parsing the next folders (a helper thread; pyarrow and file reads let go of the GIL)
        overlaps with inserting the previous ones, and many small runs share one transaction.
        """
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        runs_dir = self.settings.runs_dir
        names = [n for n in (sorted(os.listdir(runs_dir)) if runs_dir.is_dir() else []) if not n.startswith(".")]
        added = 0
        batch: list[_Pending] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-ingest") as pool:
            ahead: deque = deque()
            todo = iter(names)
            while True:
                while len(ahead) < PREFETCH and (name := next(todo, None)) is not None:
                    ahead.append(pool.submit(self._prepare_safely, name))
                if not ahead:
                    break
                pending = ahead.popleft().result()
                if pending is not None:
                    batch.append(pending)
                if batch and (not ahead or sum(p.rows for p in batch) >= BATCH_ROWS or len(batch) >= 64):
                    added += self._commit(batch)
                    batch = []
        for gone in set(self.runs) - set(names):
            self.ingest_run(gone)
        try:
            self.scan_datasets()
            ingest_events(self.reg, self.settings)  # the home's events.jsonl (zimage.registry.events)
        except Exception:
            log.exception("ingest of datasets or events failed; will retry")
        return added

    def _prepare_safely(self, run_id: str) -> _Pending | None:
        try:
            return self._prepare(run_id)
        except Exception:  # one broken folder must not stop the index
            log.exception("ingest of run %s failed; will retry", run_id)
            return None

    def scan_datasets(self) -> None:
        folders = {f.path.name: f for f in list_datasets(self.settings.datasets_dir)}
        with self.reg.write_lock:
            known = {r[0] for r in self.reg.fetch("SELECT name FROM datasets")}
            changes: list[tuple[str, DatasetFolder | None]] = [(n, None) for n in known - set(folders)]
            for name, folder in folders.items():
                sig = (_sig(folder.info_path), _sig(folder.images_dir), _sig(folder.path))
                if name not in known or self._dataset_sigs.get(name) != sig:
                    changes.append((name, folder))
                    self._dataset_sigs[name] = sig
            if not changes:
                return
            with self.reg.write() as cur:
                for name, folder in changes:
                    cur.execute("DELETE FROM datasets WHERE name = ?", [name])
                    if folder is None:
                        self._dataset_sigs.pop(name, None)
                        continue
                    info, items = folder.info_or_problem(), folder.items()
                    captioned = sum(1 for i in items if i.caption_path.exists())
                    try:
                        updated = folder.info_path.stat().st_mtime
                    except OSError:
                        updated = None
                    if isinstance(info, Damaged):  # indexed with its reason; never stops the other datasets
                        values = [name, "damaged", "", info.problem, None, len(items), captioned, "",
                                  str(folder.path), updated, info.problem]  # fmt: skip
                    else:
                        values = [
                            name, info.type, info.trigger_word, info.description, to_int(info.resolution),
                            len(items), captioned, to_str(info.created), str(folder.path), updated, None,
                        ]  # fmt: skip
                    cur.execute(
                        "INSERT INTO datasets (name, type, trigger_word, description, resolution, num_images, "
                        "captioned, created, path, updated, problem) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        values,
                    )

    # -- one run ------------------------------------------------------------------------------------
    def ingest_run(self, run_id: str) -> int:
        """Bring one run up to date; returns the number of metric rows added."""
        with self.reg.write_lock:
            path = self.settings.runs_dir / run_id
            if run_id in self.runs and not path.is_dir():
                self._forget(run_id)
                return 0
            pending = self._prepare(run_id)
            added = self._commit([pending]) if pending is not None else 0
            ingest_events(self.reg, self.settings)  # a button press: its event shows on the run's timeline now
            return added

    def _forget(self, run_id: str) -> None:
        with self.reg.write() as cur:
            for table in ("runs", "metrics", "samples", "checkpoints", "ingest_files"):
                cur.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])
        self.runs.pop(run_id, None)
        self._sigs.pop(run_id, None)
        for key in [k for k in self.files if k[0] == run_id]:
            del self.files[key]

    def _prepare(self, run_id: str) -> _Pending | None:
        """Read what changed in one folder and build its rows; touches neither the database nor memory."""
        path = self.settings.runs_dir / run_id
        if not os.path.lexists(path / "status.json"):
            return None  # a folder still being created, or gone (a folder where the file belongs is damaged)
        base_row = self.runs.get(run_id)
        old_sigs = self._sigs.get(run_id, {})
        p = _Pending(
            run_id=run_id,
            base=(base_row, self.files.get((run_id, "metrics")), self.files.get((run_id, "samples")), old_sigs),
            sigs={n: _sig(path / n) for n in ("status.json", "config.json", "checkpoints")},
            row=dict(base_row or {c: None for c in RUN_COLUMNS}, run_id=run_id),
            changed=base_row is None,
        )
        row = p.row
        if any(p.sigs[n] != old_sigs.get(n) for n in ("status.json", "config.json")):
            _apply_files(row, path)  # both, together: `problem` is what is wrong with either of them
            p.changed = True
        if p.sigs["checkpoints"] != old_sigs.get("checkpoints"):
            p.checkpoints = list_checkpoints(run_id, path / "checkpoints")
            row["checkpoints_count"] = len(p.checkpoints)
            p.changed = True

        p.metrics, p.m_rec, p.m_reset = self._read_appended(run_id, path / "metrics.jsonl", "metrics", parse_metrics)
        p.samples, p.s_rec, p.s_reset = self._read_appended(run_id, path / "samples.jsonl", "samples", parse_samples)
        if p.m_reset:
            for c in ("metrics_rows", "first_metric_step", "last_metric_step", "last_loss", "last_lr"):
                row[c] = None
            row.update(last_step_time=None, eta=None)
        if p.s_reset:
            row.update(samples_count=None, last_sample_path=None)
        if p.metrics is not None and p.metrics.table is not None and p.metrics.table.num_rows:
            p.metrics.table = drop_superseded(p.metrics.table)
            first = p.metrics.table.column("step")[0].as_py()  # the chunk's smallest step, after the drop
            if row["last_metric_step"] is not None and first <= row["last_metric_step"]:
                p.m_redo_from = first
                if row["first_metric_step"] is not None and first <= row["first_metric_step"]:
                    row["first_metric_step"] = None
            apply_metrics(row, p.metrics.table)
        if p.samples is not None and p.samples.rows:
            row["samples_count"] = (row["samples_count"] or 0) + len(p.samples.rows)
            row["last_sample_path"] = p.samples.rows[-1]["path"]  # relative to the run folder
        if p.m_rec is not None or p.s_rec is not None:
            recs = (p.m_rec or p.base[1], p.s_rec or p.base[2])
            row["malformed_lines"] = sum(rec["malformed"] for rec in recs if rec)
            p.changed = True
        return p

    def _is_stale(self, p: _Pending) -> bool:
        # Prepared in the helper thread while someone else (a page's refresh) committed this run.
        base = (self.runs.get(p.run_id), self.files.get((p.run_id, "metrics")), self.files.get((p.run_id, "samples")))
        return (
            any(a is not b for a, b in zip(base, p.base[:3], strict=True)) or self._sigs.get(p.run_id, {}) != p.base[3]
        )

    def _commit(self, batch: list[_Pending]) -> int:
        """Write prepared runs in one transaction; memory follows only what was committed."""
        with self.reg.write_lock:
            batch = [self._prepare(p.run_id) if self._is_stale(p) else p for p in batch]
            batch = [p for p in batch if p is not None]
            if any(p.changed for p in batch):
                with self.reg.write() as cur:
                    for p in batch:
                        if p.changed:
                            self._write(cur, p)
            added = 0
            for p in batch:
                self._sigs[p.run_id] = p.sigs
                if not p.changed:
                    continue
                self.runs[p.run_id] = p.row
                for name, rec in (("metrics", p.m_rec), ("samples", p.s_rec)):
                    if rec is not None:
                        self.files[(p.run_id, name)] = rec
                for chunk, name in ((p.metrics, "metrics.jsonl"), (p.samples, "samples.jsonl")):
                    if chunk is not None and chunk.malformed:
                        log.warning(
                            "run %s: %s has %d malformed line(s), skipped; e.g. %r",
                            p.run_id, name, chunk.malformed, chunk.bad_examples[:1],
                        )  # fmt: skip
                added += p.rows
            return added

    @staticmethod
    def _write(cur, p: _Pending) -> None:
        run_id = p.run_id
        if p.m_reset:
            cur.execute("DELETE FROM metrics WHERE run_id = ?", [run_id])
        if p.s_reset:
            cur.execute("DELETE FROM samples WHERE run_id = ?", [run_id])
        if p.m_redo_from is not None:
            where = "FROM metrics WHERE run_id = ? AND step >= ?"
            (voided,) = cur.execute(f"SELECT count(*) {where}", [run_id, p.m_redo_from]).fetchone()
            cur.execute(f"DELETE {where}", [run_id, p.m_redo_from])
            p.row["metrics_rows"] -= voided
        if p.rows:
            cur.register("_new_metrics", p.metrics.table)
            cur.execute(
                f"INSERT INTO metrics SELECT ?, ?, {_METRIC_SELECT} FROM _new_metrics", [run_id, run_time_of(run_id)]
            )
            cur.unregister("_new_metrics")
        if p.samples is not None and p.samples.rows:
            cur.executemany(
                "INSERT INTO samples VALUES (?, ?, ?, ?, ?, ?, ?)",
                [[run_id, r["line"], r["step"], r["prompt"], r["seed"], r["path"], r["extra"]] for r in p.samples.rows],
            )
        if p.checkpoints is not None:
            cur.execute("DELETE FROM checkpoints WHERE run_id = ?", [run_id])
            if p.checkpoints:
                cur.executemany("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)", p.checkpoints)
        cur.execute(_UPSERT_RUN, [p.row[c] for c in RUN_COLUMNS])
        for name, rec in (("metrics", p.m_rec), ("samples", p.s_rec)):
            if rec is not None:
                cur.execute(
                    "INSERT INTO ingest_files VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, file) DO UPDATE SET "
                    "pos = excluded.pos, lines = excluded.lines, malformed = excluded.malformed, ino = excluded.ino",
                    [run_id, name, rec["pos"], rec["lines"], rec["malformed"], rec["ino"]],
                )

    def _read_appended(self, run_id: str, path: Path, name: str, parse):
        """New complete lines of an append-only file: (chunk or None, new offset record or None, reset)."""
        rec = self.files.get((run_id, name))
        try:
            st = path.stat()
        except FileNotFoundError:
            if rec and rec["pos"]:  # the file went away: its rows go too
                return None, {"pos": 0, "lines": 0, "malformed": 0, "ino": None}, True
            return None, None, False
        reset = bool(rec) and (st.st_size < rec["pos"] or (rec["ino"] is not None and st.st_ino != rec["ino"]))
        if not rec or reset:
            rec = {"pos": 0, "lines": 0, "malformed": 0, "ino": st.st_ino}
            if st.st_size == 0:
                return None, (rec if reset else None), reset
        if st.st_size == rec["pos"]:
            return None, (rec if reset else None), reset
        data = read_new_bytes(path, rec["pos"])
        if not data:
            return None, (rec if reset else None), reset
        chunk = parse(data, rec["lines"])
        new = {
            "pos": rec["pos"] + chunk.consumed,
            "lines": rec["lines"] + chunk.lines,
            "malformed": rec["malformed"] + chunk.malformed,
            "ino": st.st_ino,
        }
        return chunk, new, reset


def _apply_files(row: dict, path: Path) -> None:
    """The columns taken from status.json and config.json, and what is wrong with them."""
    status = read_status(path / "status.json", missing={})
    config = read_config(path / "config.json", missing={})
    if isinstance(status, Damaged):
        apply_status(row, salvage_status(status.data))  # kind, user, name... when they are sound
        row.update(state=DAMAGED, status=None)
    else:
        apply_status(row, status_fields(status) if status else {})
    apply_config(row, config.model_dump() if config and not isinstance(config, Damaged) else {})
    row["problem"] = "; ".join(r.problem for r in (status, config) if isinstance(r, Damaged)) or None


def rebuild_into(db_file: Path, settings: Settings) -> dict:
    """Build a complete registry from the folders into a new file; returns row counts."""
    if db_file.exists():
        db_file.unlink()
    reg = Registry(db_file)
    try:
        started = time.perf_counter()
        Ingester(reg, settings).scan()
        counts = {t: reg.fetch(f"SELECT count(*) FROM {t}")[0][0] for t in ("runs", "metrics", "samples", "datasets")}
        counts["seconds"] = round(time.perf_counter() - started, 3)
    finally:
        reg.close()
    return counts
