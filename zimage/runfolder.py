"""The run-folder protocol (DESIGN.md section 2): the files a worker and the app exchange.

A worker (trainer, captioner, test grid; its lifecycle is zimage.job) owns its folder: it writes
status.json atomically, appends metrics.jsonl / samples.jsonl and polls control.json. The app and the CLI
write control.json (requests) and, for a queued job or a worker that is gone, status.json. Nothing here
touches the database.

    config.json    what was asked (never changed after launch, except by resume)
    status.json    state, kind, step, total_steps, pid, pid_start_time, host, cuda_visible_devices,
                   heartbeat, started, ended, error, traceback, control_done (times are Unix seconds)
    control.json   {"requests": [{"id": "...", "action": "stop", "at": t, "user": "ann"}, ...]}
    metrics.jsonl  one JSON object per logged step
    samples.jsonl  one JSON object per sample image: step, prompt, seed, path (relative to the folder)
    log.txt, samples/, checkpoints/

No control request is lost and none runs twice: only the app/CLI writes control.json, appending one
request with a fresh id under a file lock (.control.lock, beside it); the worker never writes it, and records the ids it has acted
on in status.json (`control_done`), so a resumed run never repeats what its predecessor did.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from zimage.fsio import read_json, write_json

__all__ = ["ControlRequests", "RunFolder", "process_start_time", "read_json", "silence"]

STATES = ("queued", "starting", "running", "paused", "stopping", "completed", "stopped", "failed", "lost")
FINAL_STATES = ("completed", "stopped", "failed", "lost")
ACTIVE_STATES = ("starting", "running", "paused", "stopping")
CONTROL_ACTIONS = ("stop", "pause", "resume", "save_now", "sample_now")
METRIC_FIELDS = (
    "step", "loss", "lr", "grad_norm", "step_time", "samples_per_s", "mem_allocated", "mem_peak", "elapsed", "eta",
)  # fmt: skip


def process_start_time(pid: int) -> float | None:
    """The process's start time (Unix seconds), or None if there is no such process.

    A PID plus its start time names one process for good: a reused PID has a different start time.
    """
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


@dataclass
class ControlRequests:
    """What the app asks of the worker now (the worker-facing result of polling control.json)."""

    stop: bool = False  # a stop was asked (stays True for the rest of the process)
    pause: bool = False  # the wanted state: the newest pause / resume request wins
    save_now: bool = False  # new save-now request(s) since the last poll
    sample_now: bool = False  # new sample-now request(s) since the last poll


STALE_HEARTBEAT_S = 90.0  # workers stamp status.json every few seconds; this much silence is news
LIVE_STATES = ("starting", "running", "paused")


def silence(state: str | None, heartbeat: Any, now: float | None = None) -> float | None:
    """Seconds since a live run's last heartbeat, when longer than STALE_HEARTBEAT_S; else None.

    A worker that died is marked `lost` by the scheduler within seconds; one whose process is alive but
    stuck (a hung file system, a deadlock, a wedged GPU) only goes quiet, and this is how that shows.
    """
    try:
        beat = float(heartbeat)
    except (TypeError, ValueError):
        return None
    if state not in LIVE_STATES or beat != beat:  # NaN: no heartbeat known
        return None
    quiet = (time.time() if now is None else now) - beat
    return quiet if quiet >= STALE_HEARTBEAT_S else None


class RunFolder:
    """One job folder: typed access to its files, for the worker side and the app side alike."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._control_file = os.fspath(self.path / "control.json")  # polled every step: no Path work then
        self._control_key: tuple | None = None  # (inode, mtime, size) of the control.json last read
        self._done: list[str] | None = None  # ids acted on (status.json control_done), loaded on first need
        self._stop_wanted = False
        self._pause_wanted = False
        self._status_lock = threading.Lock()  # a heartbeat thread and the worker both update status.json

    # -- paths ------------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.json")
    status_path = property(lambda self: self.path / "status.json")
    control_path = property(lambda self: self.path / "control.json")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    samples_path = property(lambda self: self.path / "samples.jsonl")
    log_path = property(lambda self: self.path / "log.txt")
    samples_dir = property(lambda self: self.path / "samples")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")

    # -- config -----------------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        write_json(self.config_path, config)

    def read_config(self) -> dict:
        return read_json(self.config_path, {})

    # -- status -----------------------------------------------------------------------------------
    def read_status(self) -> dict:
        status = read_json(self.status_path, {})
        return status if isinstance(status, dict) else {}

    def update_status(self, **fields: Any) -> dict:
        """Merge `fields` into status.json and write it atomically; always stamps `heartbeat`."""
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown state {fields['state']!r}")
        with self._status_lock:
            status = self.read_status()
            status.update(fields)
            status["heartbeat"] = time.time()
            write_json(self.status_path, status)
        return status

    def mark_worker_started(self, kind: str, total_steps: int | None = None) -> dict:
        """Call first thing in a worker: records who is running the folder (PID + start time, host) and
        which GPUs it was given. `control_done` is kept: a resumed run must not repeat those requests."""
        pid = os.getpid()
        return self.update_status(
            state="starting",
            kind=kind,
            pid=pid,
            pid_start_time=process_start_time(pid),
            host=socket.gethostname(),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            started=time.time(),
            ended=None,
            error=None,
            traceback=None,
            **({"total_steps": total_steps} if total_steps is not None else {}),
        )

    def worker_alive(self) -> bool:
        """True if the PID in status.json is running and is the same process (start time matches)."""
        status = self.read_status()
        pid, started = status.get("pid"), status.get("pid_start_time")
        if not pid:
            return False
        now = process_start_time(int(pid))
        if now is None:
            return False
        return started is None or abs(now - float(started)) < 1.0

    # -- control: the app side ----------------------------------------------------------------------
    def read_control(self) -> list[dict]:
        """The requests in control.json, oldest first. A missing or damaged file (or entry) has none."""
        data = read_json(self.control_path, None)
        requests = data.get("requests") if isinstance(data, dict) else None
        if not isinstance(requests, list):
            return []
        return [r for r in requests
                if isinstance(r, dict) and isinstance(r.get("id"), str) and r.get("action") in CONTROL_ACTIONS]  # fmt: skip

    def send_control(self, action: str, user: str | None = None) -> dict:
        """App / CLI side: append one request with a fresh id to control.json; returns the request.

        The read, the append and the atomic rewrite happen under a file lock, so two writers at the same
        time (two browser sessions, the CLI) never lose each other's requests.
        """
        if action not in CONTROL_ACTIONS:
            raise ValueError(f"unknown control action {action!r}; allowed: {', '.join(CONTROL_ACTIONS)}")
        request = {"id": f"{time.time_ns():x}-{secrets.token_hex(4)}", "action": action, "at": time.time()}
        if user:
            request["user"] = user
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path / ".control.lock"):
            write_json(self.control_path, {"requests": [*self.read_control(), request]})
        return request

    def retire_control(self) -> None:
        """Before a run is resumed (requeue, `zimage train --resume`): count every request in control.json
        as handled, so the stop that ended the earlier process, or a request it never saw, does not act
        on the new one."""
        done = self.handled_control()
        seen = set(done)
        new = [r["id"] for r in self.read_control() if r["id"] not in seen]
        if new:
            self.update_status(control_done=done + new)
        self._done = None  # re-read on the next poll

    def handled_control(self) -> list[str]:
        """Ids of the requests this run's workers have acted on (status.json `control_done`)."""
        done = self.read_status().get("control_done")
        return [str(i) for i in done] if isinstance(done, list) else []

    # -- control: the worker side -------------------------------------------------------------------
    def poll_control(self) -> ControlRequests:
        """Worker side, every step: one stat() when nothing changed. Each request id is acted on once,
        and recorded in status.json before it is acted on, so no later process of the run repeats it."""
        try:
            st = os.stat(self._control_file)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)  # rewritten by rename: a new inode every time
        except FileNotFoundError:
            key = None
        save = sample = False
        if key is not None and key != self._control_key:
            self._control_key = key
            if self._done is None:
                self._done = self.handled_control()
            seen = set(self._done)
            new = [r for r in self.read_control() if r["id"] not in seen]
            for request in new:  # oldest first: the newest pause / resume decides the wanted state
                action = request["action"]
                self._stop_wanted |= action == "stop"
                if action in ("pause", "resume"):
                    self._pause_wanted = action == "pause"
                save |= action == "save_now"
                sample |= action == "sample_now"
            if new:
                self._done += [r["id"] for r in new]
                try:
                    self.update_status(control_done=list(self._done))
                except OSError:  # a full disk: this process still acts once (the ids are in memory)
                    pass
        return ControlRequests(stop=self._stop_wanted, pause=self._pause_wanted, save_now=save, sample_now=sample)

    # -- append-only logs -------------------------------------------------------------------------
    def _append(self, path: Path, *records: dict) -> None:
        # One write() of whole lines: a reader never sees a line that is half ours and half another's.
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records)
        with open(path, "ab") as fh:
            fh.write(data.encode("utf-8"))

    def append_metrics(self, *records: dict) -> None:
        """Append one line per record (a trainer's pending lines go in one write)."""
        if records:
            self._append(self.metrics_path, *records)

    def append_sample(self, record: dict) -> None:
        self._append(self.samples_path, record)

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(f"[{stamp}] {message}\n")
            fh.flush()
