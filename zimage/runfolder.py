"""The run-folder protocol (DESIGN.md section 2): the files a worker and the app exchange.

A worker (trainer, captioner, test grid) owns its folder: it writes status.json atomically, appends
metrics.jsonl / samples.jsonl, and polls control.json. The app writes control.json (requests) and, only
for a worker that is gone, the final `lost` state. Nothing here touches the database.

    config.json    what was asked (never changed after launch, except by resume)
    status.json    state, kind, step, total_steps, pid, pid_start_time, host, heartbeat, started, ended,
                   error, traceback (times are Unix seconds)
    control.json   {"stop": bool, "pause": bool, "save_now": n, "sample_now": n, "updated": t}
    metrics.jsonl  one JSON object per logged step
    samples.jsonl  one JSON object per sample image: step, prompt, seed, path (relative to the folder)
    log.txt, samples/, checkpoints/
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zimage.data.folders import atomic_write_text

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


def read_json(path: Path, default: Any = None) -> Any:
    """Read a JSON file; a missing or half-written file gives `default` instead of an exception."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return default


@dataclass
class ControlRequests:
    """What the app asked for since the last poll."""

    stop: bool = False
    pause: bool = False  # the wanted state: True while the app wants the run paused
    save_now: bool = False
    sample_now: bool = False


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
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._seen_save = 0
        self._seen_sample = 0
        self._control_mtime: int | None = None
        self._last_control = ControlRequests()
        self._control_file = os.fspath(self.path / "control.json")  # polled every step: no Path work then
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
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict:
        return read_json(self.config_path, {})

    # -- status -----------------------------------------------------------------------------------
    def read_status(self) -> dict:
        return read_json(self.status_path, {}) or {}

    def update_status(self, **fields: Any) -> dict:
        """Merge `fields` into status.json and write it atomically; always stamps `heartbeat`."""
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown state {fields['state']!r}")
        with self._status_lock:
            status = self.read_status()
            status.update(fields)
            status["heartbeat"] = time.time()
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.status_path, json.dumps(status, indent=2, sort_keys=True) + "\n")
        return status

    @contextmanager
    def heartbeat(self, interval: float = 5.0) -> Iterator[None]:
        """Stamp status.json every `interval` s while the block runs (model downloads, long batches), so
        the app can tell a slow worker from a stuck one (DESIGN: at least every 10 s)."""
        done = threading.Event()

        def beat() -> None:
            while not done.wait(interval):
                try:
                    self.update_status()
                except OSError:  # a full disk must not kill the job; the next beat tries again
                    pass

        thread = threading.Thread(target=beat, name="zimage-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=interval + 5)

    def mark_worker_started(self, kind: str, total_steps: int | None = None) -> dict:
        """Call first thing in a worker: records who is running the folder (PID + start time, host)."""
        pid = os.getpid()
        return self.update_status(
            state="starting",
            kind=kind,
            pid=pid,
            pid_start_time=process_start_time(pid),
            host=socket.gethostname(),
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

    # -- control ----------------------------------------------------------------------------------
    def send_control(self, action: str) -> dict:
        """App side: record a request. stop/pause/resume set a wanted state; save_now/sample_now count up."""
        if action not in CONTROL_ACTIONS:
            raise ValueError(f"unknown control action {action!r}; allowed: {', '.join(CONTROL_ACTIONS)}")
        control = read_json(self.control_path, {}) or {}
        if action == "stop":
            control["stop"] = True
        elif action == "pause":
            control["pause"] = True
        elif action == "resume":
            control["pause"] = False
        else:
            control[action] = int(control.get(action, 0)) + 1
        control["updated"] = time.time()
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.control_path, json.dumps(control, indent=2) + "\n")
        return control

    def poll_control(self) -> ControlRequests:
        """Worker side: cheap (one stat) when nothing changed. save_now / sample_now fire once each."""
        try:
            mtime = os.stat(self._control_file).st_mtime_ns
        except FileNotFoundError:
            return ControlRequests()
        if mtime == self._control_mtime:
            return ControlRequests(stop=self._last_control.stop, pause=self._last_control.pause)
        self._control_mtime = mtime
        control = read_json(self.control_path, {}) or {}
        save, sample = int(control.get("save_now", 0)), int(control.get("sample_now", 0))
        req = ControlRequests(
            stop=bool(control.get("stop")),
            pause=bool(control.get("pause")),
            save_now=save > self._seen_save,
            sample_now=sample > self._seen_sample,
        )
        self._seen_save, self._seen_sample = save, sample
        self._last_control = req
        return req

    def skip_pending_control(self) -> None:
        """On resume: counters already in control.json were handled by the earlier process."""
        control = read_json(self.control_path, {}) or {}
        self._seen_save, self._seen_sample = int(control.get("save_now", 0)), int(control.get("sample_now", 0))

    def clear_stop(self) -> None:
        """Before a resume, forget the stop request that ended the earlier process."""
        control = read_json(self.control_path, {}) or {}
        if control.get("stop") or control.get("pause"):
            control["stop"] = False
            control["pause"] = False
            atomic_write_text(self.control_path, json.dumps(control, indent=2) + "\n")

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
