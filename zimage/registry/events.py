"""The `events` table: the home's events.jsonl (zimage.events) in the registry, and its queries.

The home-wide file holds every event, so it is the only source: each complete line becomes one row keyed
by its line number, read on from a byte offset kept in `ingest_files` (run_id "(home)"), in the same
transaction as the rows. A file that shrank or was replaced is read again from the start, and a rebuild
reads it whole, so the table comes back exactly. A line that is not an event is counted, never fatal.
"""

from __future__ import annotations

import os

import pandas as pd

from zimage.events import EVENTS_FILE, home_events_path, parse_line
from zimage.registry.db import Registry
from zimage.registry.jsonl import read_new_bytes
from zimage.settings import Settings

HOME_KEY = "(home)"  # the ingest_files row of the home-wide file
COLUMNS = ("line", "time", "user_name", "role", "action", "target", "owner", "source", "result", "detail", "as_admin")
_INSERT = f"INSERT INTO events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def ingest_events(reg: Registry, settings: Settings) -> int:
    """Read new lines of the home's events.jsonl into the table; returns the rows added."""
    path = home_events_path(settings)
    with reg.write_lock:
        known = reg.fetch("SELECT pos, lines, malformed, ino FROM ingest_files WHERE run_id = ? AND file = ?",
                          [HOME_KEY, EVENTS_FILE])  # fmt: skip
        pos, lines, malformed, ino = known[0] if known else (0, 0, 0, None)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if known:
                with reg.write() as cur:
                    cur.execute("DELETE FROM events")
                    cur.execute("DELETE FROM ingest_files WHERE run_id = ?", [HOME_KEY])
            return 0
        reset = (ino is not None and ino != st.st_ino) or st.st_size < pos
        if reset:
            pos, lines, malformed = 0, 0, 0
        if st.st_size == pos and not reset:
            return 0
        rows = []
        while True:
            data = read_new_bytes(path, pos)
            if not data:
                break
            pos += len(data)
            for raw in data.split(b"\n")[:-1]:
                rec = parse_line(raw) if raw.strip() else None
                if rec is None:
                    malformed += 1 if raw.strip() else 0
                else:
                    rows.append([lines, rec.time, rec.user, rec.role, rec.action, rec.target, rec.owner, rec.source,
                                 rec.result, rec.detail, rec.as_admin])  # fmt: skip
                lines += 1
        with reg.write() as cur:
            if reset:
                cur.execute("DELETE FROM events")
            if rows:
                cur.executemany(_INSERT, rows)
            cur.execute(
                "INSERT INTO ingest_files VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, file) DO UPDATE SET "
                "pos = excluded.pos, lines = excluded.lines, malformed = excluded.malformed, ino = excluded.ino",
                [HOME_KEY, EVENTS_FILE, pos, lines, malformed, st.st_ino],
            )
    return len(rows)


def events(
    reg: Registry,
    target: str | None = None,
    user: str | None = None,
    result: str | None = None,
    action: str | None = None,
    limit: int = 500,
) -> pd.DataFrame:
    """Events, newest first; `target` like "run:<id>" or "dataset:<name>", `action` a prefix ("run.")."""
    where, params = [], []
    for column, value in (("target", target), ("user_name", user), ("result", result)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if action:
        where.append("starts_with(action, ?)")
        params.append(action)
    sql = f"SELECT {', '.join(COLUMNS)} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return reg.fetch_df(sql + " ORDER BY line DESC LIMIT ?", [*params, int(limit)])


def run_timeline(reg: Registry, run_id: str, limit: int = 200) -> pd.DataFrame:
    """What people did to one run (launch, control requests, refusals), oldest first."""
    df = events(reg, target=f"run:{run_id}", limit=limit)
    return df.iloc[::-1].reset_index(drop=True)
