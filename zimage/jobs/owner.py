"""Who runs this host's scheduler, and how other processes talk to it.

- `registry/scheduler.lock` (a `filelock` lock: flock on POSIX, exclusive): held for its whole life by the one process that runs the
  scheduler and owns registry.duckdb: the app's background thread or `zimage worker`. The kernel drops
  it when that process dies, however it dies, so a crashed owner never blocks the next one.
- `registry/scheduler.json`: who holds it (pid, role "app" | "worker", host, since), for messages.
- `registry/inbox/`: requests for the owner, one JSON file each (written atomically); the owner answers
  in `registry/inbox/replies/<id>.json`. Used for `registry rebuild` while the app runs, and by an app
  that starts while `zimage worker` runs: it asks the worker to hand the registry over.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from zimage.fsio import read_json, write_json
from zimage.settings import Settings


class OwnerLock:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.path = settings.registry_dir / "scheduler.lock"
        self.info_path = settings.registry_dir / "scheduler.json"
        # thread_local=False: the scheduler thread takes it, and the process's shutdown may release it.
        self._lock = FileLock(self.path, timeout=0, thread_local=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def try_acquire(self, role: str) -> bool:
        """Take the lock if nobody holds it; never blocks."""
        if self._lock.is_locked:
            return True
        self.settings.registry_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        info = {"pid": os.getpid(), "role": role, "host": socket.gethostname(), "since": time.time()}
        write_json(self.info_path, info)
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release(force=True)

    def owner(self) -> dict | None:
        """Who holds the lock now (None if nobody does)."""
        if self._lock.is_locked:
            return read_json(self.info_path, {})
        if not self.path.exists():
            return None
        probe = FileLock(self.path, timeout=0, thread_local=False)
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return read_json(self.info_path, {}) or {"pid": None, "role": "unknown"}
        probe.release(force=True)
        return None


def describe_owner(info: dict | None) -> str:
    if not info:
        return "nobody"
    role = {"app": "the zimage app", "worker": "`zimage worker`"}.get(info.get("role"), "another process")
    return f"{role} (pid {info.get('pid')} on {info.get('host', '?')})"


def inbox_dir(settings: Settings) -> Path:
    return settings.registry_dir / "inbox"


def post_request(settings: Settings, action: str, **fields) -> str:
    """Leave a request for the owner; returns its id."""
    req_id = f"{int(time.time() * 1000)}-{secrets.token_hex(4)}"
    inbox_dir(settings).mkdir(parents=True, exist_ok=True)
    body = {"id": req_id, "action": action, "pid": os.getpid(), "posted": time.time(), **fields}
    write_json(inbox_dir(settings) / f"{req_id}.json", body)
    return req_id


def take_requests(settings: Settings) -> list[dict]:
    """Owner side: the pending requests, oldest first, removed from the inbox."""
    folder = inbox_dir(settings)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        req = read_json(path)
        path.unlink(missing_ok=True)
        if isinstance(req, dict) and req.get("id"):
            out.append(req)
    return out


def reply(settings: Settings, req_id: str, answer: dict) -> None:
    folder = inbox_dir(settings) / "replies"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{req_id}.json", json.loads(json.dumps(answer, default=str)))


def wait_reply(settings: Settings, req_id: str, timeout: float) -> dict | None:
    """The owner's answer, or None if none came within `timeout` seconds."""
    path = inbox_dir(settings) / "replies" / f"{req_id}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = read_json(path)
        if answer is not None:
            path.unlink(missing_ok=True)
            return answer
        time.sleep(0.1)
    return None
