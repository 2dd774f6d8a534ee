"""The record of every action: who did what to which run, dataset or user, from where, and how it ended.

One JSON object per line, appended to `ZIMAGE_HOME/events.jsonl` (the whole home: the registry's
`events` table is read from it, so `zimage registry rebuild` restores the table exactly) and to the
`events.jsonl` of the run or dataset folder the action touched (its own history travels with it).

    {"time": 1764758400.1, "user": "alice", "role": "member", "action": "run.stop",
     "target": "run:20261203-101500-cat-1a2b", "owner": "bob", "source": "ui", "result": "refused",
     "detail": "run ... is owned by bob; ...", "as_admin": false}

`result` is `done`, `refused` (a permission check said no) or `failed` (the request itself was wrong,
e.g. the run is not running). Lines are appended with one `write()` on a file opened with O_APPEND, so
lines of writers in several processes never interleave (a line is far below the size the kernel writes
in one piece); this is the one append-only writer besides the run folder's metrics lines, and a reader
treats a last line without its newline as not yet written.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import ValidationError

from zimage.records import Record
from zimage.settings import Settings

EVENTS_FILE = "events.jsonl"
RESULTS = ("done", "refused", "failed")
SOURCES = ("ui", "cli")
MAX_DETAIL = 1000  # characters; keeps every line well inside one atomic write


class EventRecord(Record):
    """One line of events.jsonl as read back."""

    time: float
    user: str
    role: str = ""
    action: str
    target: str = ""
    owner: str | None = None
    source: str = "cli"
    result: str = "done"
    detail: str = ""
    as_admin: bool = False


@dataclass
class Event:
    user: str
    role: str
    action: str  # "run.stop", "dataset.delete", "user.add", "login", ...
    target: str = ""  # "run:<id>", "dataset:<name>", "user:<name>", "" for the home
    owner: str | None = None
    source: str = "cli"
    result: str = "done"
    detail: str = ""
    as_admin: bool = False
    time: float = field(default_factory=time.time)

    def line(self) -> bytes:
        data = asdict(self)
        data["detail"] = str(data["detail"] or "")[:MAX_DETAIL]
        return (json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def home_events_path(settings: Settings) -> Path:
    return settings.home / EVENTS_FILE


def append_line(path: Path, line: bytes) -> None:
    """Append one whole line in one write (O_APPEND: concurrent writers never interleave within a line)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def record(settings: Settings, event: Event, folder: Path | None = None) -> Event:
    """Append `event` to the home's events.jsonl and, when given and still there, to `folder`/events.jsonl."""
    line = event.line()
    settings.home.mkdir(parents=True, exist_ok=True)
    append_line(home_events_path(settings), line)
    if folder is not None and folder.is_dir():
        try:
            append_line(folder / EVENTS_FILE, line)
        except OSError:  # the folder went away meanwhile (deleted): the home-wide line is the record
            pass
    return event


def parse_line(raw: bytes) -> EventRecord | None:
    """One line as an EventRecord, or None when it is not one (damaged lines are skipped, never fatal)."""
    try:
        return EventRecord.model_validate(json.loads(raw))
    except (ValueError, ValidationError, UnicodeDecodeError):
        return None


def read_events(path: Path) -> list[EventRecord]:
    """Every complete, valid line of an events.jsonl (oldest first); a missing file gives []."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    out = []
    for raw in data.split(b"\n")[:-1]:  # the part after the last newline is not written yet
        rec = parse_line(raw) if raw.strip() else None
        if rec is not None:
            out.append(rec)
    return out
