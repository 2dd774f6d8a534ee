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

Every file is read back through zimage.run_records (one schema per file kind): a damaged status.json is
`status_or_problem()` -> Damaged for the app side, a malformed control request is skipped with one line in
log.txt, and status.json is written with non-finite numbers as null, so the final state always lands.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from zimage.errors import UserError
from zimage.fsio import read_json, write_json
from zimage.records import Damaged
from zimage.run_records import (
    ACTIVE_STATES,
    CONTROL_ACTIONS,
    DAMAGED,
    FINAL_STATES,
    METRIC_FIELDS,
    STATES,
    StatusRecord,
    status_fields,
)
from zimage.run_records import read_config as _read_config
from zimage.run_records import read_control as _read_control
from zimage.run_records import read_status as _read_status

__all__ = [
    "ACTIVE_STATES", "CONTROL_ACTIONS", "DAMAGED", "FINAL_STATES", "METRIC_FIELDS", "STATES", "ControlRequests",
    "DamagedRun", "RunFolder", "json_safe", "process_start_time", "read_json", "silence",
]  # fmt: skip


class DamagedRun(UserError):
    """A run-folder file that cannot be read; the message names the run, the file and the field."""


def json_safe(value: Any) -> Any:
    """`value` as plain JSON: NaN / infinity become null, numpy and torch scalars plain numbers, paths text,
    anything else its text. The status path uses it so that no value can make the write of a state fail."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if callable(getattr(value, "item", None)):  # a torch / numpy 0-d value
        try:
            return json_safe(value.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def process_start_time(pid: int) -> float | None:
    """The process's start time (Unix seconds), or None if there is no such process.

    A PID plus its start time names one process for good: a reused PID has a different start time.
    """
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, OverflowError):
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
        self._reported: set[str] = set()  # control.json problems already written to log.txt
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
        """config.json as a dict ({} when there is none); a damaged one raises DamagedRun naming the problem."""
        rec = _read_config(self.config_path)
        if isinstance(rec, Damaged):
            raise DamagedRun(f"run {self.run_id}: {rec.problem} ({self.config_path})")
        return rec.model_dump() if rec is not None else {}

    # -- status -----------------------------------------------------------------------------------
    def status_or_problem(self) -> StatusRecord | Damaged:
        """status.json as a StatusRecord (an empty one when there is none yet), or why it cannot be read."""
        rec = _read_status(self.status_path, missing=StatusRecord())
        return Damaged(rec.path, f"run {self.run_id}: {rec.problem}", rec.data) if isinstance(rec, Damaged) else rec

    def read_status(self) -> dict:
        """status.json as a dict of typed values; {} when it is missing or damaged (see status_or_problem)."""
        rec = self.status_or_problem()
        return {} if isinstance(rec, Damaged) else status_fields(rec)

    def checked_status(self) -> dict:
        """status.json as a dict; a damaged one raises DamagedRun (for actions a person asked for)."""
        rec = self.status_or_problem()
        if isinstance(rec, Damaged):
            raise DamagedRun(f"{rec.problem}; fix or delete {self.status_path}")
        return status_fields(rec)

    def update_status(self, **fields: Any) -> dict:
        """Merge `fields` into status.json and write it atomically; always stamps `heartbeat`.

        Values go through json_safe: a NaN loss or a numpy number is written as JSON can hold it, so the
        write never fails on a value (the final `failed` of a run depends on that). A damaged status.json
        is replaced by what this writer knows, with a line in log.txt."""
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown state {fields['state']!r}")
        fields = json_safe(fields)
        with self._status_lock:
            rec = self.status_or_problem()
            status = {} if isinstance(rec, Damaged) else status_fields(rec)
            status.update(fields)
            status["heartbeat"] = time.time()
            write_json(self.status_path, status)
        if isinstance(rec, Damaged):
            self._log_quietly(f"{rec.problem}; rewritten from what this process knows")
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
            **_backend_identity(),
        )

    def worker_alive(self) -> bool:
        """True if the PID in status.json is running and is the same process (start time matches)."""
        status = self.status_or_problem()
        if isinstance(status, Damaged) or not status.pid:
            return False
        now = process_start_time(status.pid)
        if now is None:
            return False
        return status.pid_start_time is None or abs(now - status.pid_start_time) < 1.0

    # -- control: the app side ----------------------------------------------------------------------
    def read_control(self) -> list[dict]:
        """The well-formed requests in control.json, oldest first. A missing or damaged file (or entry) has none."""
        return [r.model_dump(exclude_unset=True) for r in _read_control(self.control_path).requests]

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
        rec = self.status_or_problem()
        return [] if isinstance(rec, Damaged) else list(rec.control_done)

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
            found = _read_control(self.control_path)
            for key, problem in found.problems:  # said once per bad request (or damaged file), not per poll
                if key not in self._reported:
                    self._reported.add(key)
                    self._log_quietly(f"{problem}; ignored")
            new = [r for r in found.requests if r.id not in seen]
            for request in new:  # oldest first: the newest pause / resume decides the wanted state
                action = request.action
                self._stop_wanted |= action == "stop"
                if action in ("pause", "resume"):
                    self._pause_wanted = action == "pause"
                save |= action == "save_now"
                sample |= action == "sample_now"
            if new:
                self._done += [r.id for r in new]
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

    def _log_quietly(self, message: str) -> None:
        try:
            self.log(message)
        except OSError:  # a full disk must not turn a skipped request into a failed run
            pass


def _backend_identity() -> dict:
    """The cluster job a worker runs in, where a cluster launcher started it (ZIMAGE_BACKEND_LOG is set):
    the backend (ZIMAGE_BACKEND), Ray's submission id (ZIMAGE_BACKEND_JOB_ID), Slurm's SLURM_JOB_ID or
    submitit's local job id, and the backend's log of that job (`%j` is the job id)."""
    log = os.environ.get("ZIMAGE_BACKEND_LOG")
    if log is None:
        return {}
    env = os.environ
    job_id = env.get("ZIMAGE_BACKEND_JOB_ID") or env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")
    fields = {"backend_log": log.replace("%j", job_id) if job_id else log} if log else {}
    backend = {"backend": env["ZIMAGE_BACKEND"]} if env.get("ZIMAGE_BACKEND") else {}
    return {**backend, **fields, **({"backend_job_id": job_id} if job_id else {})}
