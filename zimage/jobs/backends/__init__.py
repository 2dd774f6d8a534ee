"""Where a job that the scheduler releases runs: one small interface, three launchers.

The queue, priorities and per-user limits stay in the studio (zimage.jobs.dispatch); a backend only runs
what the scheduler releases, on a shared filesystem (ZIMAGE_HOME is the same path on every node):

    backend.submit(spec) -> Handle     start `spec`'s worker command; the handle names the backend's job
    backend.poll(handle) -> Poll       running | finished | failed | unknown (the backend's own word in detail)
    backend.cancel(handle)             end the job through the backend (after a stop the worker ignored)
    backend.capacity() -> Capacity     the slots it offers (local GPU ids, Ray's GPUs, Slurm's max_jobs)
    backend.health() -> Health         reachable or not, with the error; for Home and `zimage queue`
    backend.preview(spec) -> str       what submit(spec) would send, as text; sends and writes nothing
                                       (`zimage queue add --dry-run`)

- `local` (local.py): a detached process on this host (zimage.jobs.launcher), the default;
- `ray` (ray_jobs.py): Ray Jobs through `JobSubmissionClient` (the `[ray]` extra);
- `slurm` (slurm.py): sbatch through submitit, the worker's command line as a `CommandFunction` (the
  `[slurm]` extra).
The home chooses one (`launcher = "ray"` at the top of settings.toml) and a job may name another
(`zimage queue add --backend slurm`, status.json `backend`). Stop, pause and save-now still go through
control.json on the shared filesystem whatever runs the worker.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zimage.errors import UserError
from zimage.settings import Settings

log = logging.getLogger("zimage.jobs")

BACKENDS = ("local", "ray", "slurm")
_EXTRAS = {"ray": "ray", "slurm": "submitit"}  # backend -> the module its extra installs
POLL_STATES = ("running", "finished", "failed", "unknown")
HANDLE_FIELDS = ("backend", "backend_job_id", "backend_log", "backend_address")


class BackendError(UserError):
    """A backend cannot be used (not installed, unreachable, refused the job); the message says which and why."""


@dataclass(frozen=True)
class JobSpec:
    """What a backend needs to run one released job."""

    run_id: str
    run_dir: Path
    kind: str
    gpus: int = 1  # GPUs the job needs
    user: str | None = None
    gpu_ids: tuple[str, ...] = ()  # local only: the GPUs the slots assigned


@dataclass(frozen=True)
class Handle:
    """A submitted job as its backend knows it; kept in launch.json (and status.json) of the run."""

    backend: str
    job_id: str
    log: str | None = None  # where the backend keeps the job's own output
    address: str | None = None  # the cluster it went to (Ray's dashboard address)
    extra: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        return {"backend": self.backend, "backend_job_id": self.job_id, "backend_log": self.log,
                "backend_address": self.address}  # fmt: skip

    @classmethod
    def from_fields(cls, data: dict | None) -> Handle | None:
        data = data or {}
        backend, job_id = data.get("backend"), data.get("backend_job_id")
        if not isinstance(backend, str) or not isinstance(job_id, str | int) or isinstance(job_id, bool):
            return None
        log, address = data.get("backend_log"), data.get("backend_address")
        return cls(
            backend, str(job_id), log if isinstance(log, str) else None, address if isinstance(address, str) else None
        )


@dataclass(frozen=True)
class Poll:
    state: str  # one of POLL_STATES
    detail: str = ""  # the backend's own state and message, for the run's error and log


@dataclass(frozen=True)
class Capacity:
    """Slots a backend offers: `total` units of `unit` ("GPU": a job costs its GPUs; "job": one each), and
    the most GPUs a single job may ask for (one node), None when unknown."""

    total: int
    unit: str = "job"
    per_job: int | None = None
    where: str = ""  # "on Ray", "in Slurm": for the reasons a job waits
    max_jobs: int | None = None  # at most this many of the studio's jobs at once, whatever the units say

    def cost(self, gpus: int) -> int:
        return max(1, gpus) if self.unit == "GPU" else 1


@dataclass(frozen=True)
class Health:
    ok: bool
    summary: str  # what it is and what it offers, or why it cannot be used


class Backend:
    """The interface; see the module docstring."""

    name = "?"

    def submit(self, spec: JobSpec) -> Handle:  # pragma: no cover - the interface
        raise NotImplementedError

    def poll(self, handle: Handle) -> Poll:  # pragma: no cover
        raise NotImplementedError

    def cancel(self, handle: Handle) -> None:  # pragma: no cover
        raise NotImplementedError

    def capacity(self) -> Capacity:  # pragma: no cover
        raise NotImplementedError

    def health(self) -> Health:  # pragma: no cover
        raise NotImplementedError

    def preview(self, spec: JobSpec) -> str:  # pragma: no cover
        raise NotImplementedError


class Call:
    """`fn(*args, **kwargs)` running in a daemon thread from the moment it is made; `wait(limit)` for its
    answer. A call that outlives its wait keeps running: its owner may keep the Call and ask again later
    (a slow sbatch that may still submit the job, so it must never be sent twice)."""

    def __init__(self, what: str, fn, *args, **kwargs):
        self.what, self.started = what, time.time()
        self._box: dict[str, Any] = {}

        def call() -> None:
            try:
                self._box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller
                self._box["error"] = exc

        self._thread = threading.Thread(target=call, name=f"zimage-{what.split(':')[0]}", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, limit: float):
        """The call's value, or its own exception; BackendError naming `what` when it runs past `limit` s."""
        self._thread.join(limit)
        if self._thread.is_alive():
            raise BackendError(f"{self.what}: no answer within {limit:g} s")
        if "error" in self._box:
            raise self._box["error"]
        return self._box.get("value")


_LATE: dict[str, tuple[Call, Callable[[Any], None]]] = {}  # run id -> (a submission not waited for, its undo)


def keep_late(run_id: str, call: Call, cancel: Callable[[Any], None]) -> None:
    """Keep a submission the scheduler stopped waiting for (it may still submit the job): the run's next
    submit takes its answer instead of sending the job again; `cancel(answer)` ends that job if the run
    no longer waits for it (cancelled or deleted meanwhile)."""
    _LATE[run_id] = (call, cancel)


def late(run_id: str) -> Call | None:
    """The run's kept submission; it stays kept until it has answered (then it is handed over once)."""
    kept = _LATE.get(run_id)
    if kept is not None and kept[0].done():
        del _LATE[run_id]
    return kept[0] if kept else None


def cancel_late(state_of: Callable[[str], str | None]) -> list[str]:
    """End the jobs that late submissions made for runs that no longer wait for them (`state_of(run_id)`
    is neither queued, when the run's next submit takes the job, nor active, when that job's worker already
    runs it and status.json names the job); those run ids."""
    from zimage.runfolder import ACTIVE_STATES

    ended = []
    for run_id, (call, cancel) in list(_LATE.items()):
        if not call.done():
            continue
        state = state_of(run_id)
        if state == "queued":
            continue
        del _LATE[run_id]
        if state in ACTIVE_STATES:
            continue
        try:
            answer = call.wait(0)
        except Exception:  # it failed after all: nothing was submitted
            continue
        try:
            cancel(answer)
            ended.append(run_id)
        except Exception:
            log.exception("run %s: could not cancel the job a late submission made", run_id)
    return ended


def bounded(what: str, limit: float, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a daemon thread, waited for at most `limit` s: a cluster that does not answer
    (a black-holed address, a hung slurmctld) costs the scheduler's tick that long, never the tick itself.
    Raises BackendError naming `what` on a timeout; the call's own exception otherwise."""
    return Call(what, fn, *args, **kwargs).wait(limit)


def check_backend(name: Any, field_name: str = "backend") -> str:
    """A backend name as given (CLI, settings); a clear error naming the field, or the missing extra."""
    if name not in BACKENDS:
        raise BackendError(f"{field_name}: {name!r} is not a launcher; allowed: {', '.join(BACKENDS)}")
    module = _EXTRAS.get(name)
    if module and importlib.util.find_spec(module) is None:
        raise BackendError(
            f"{field_name}: the {name} launcher needs the [{name}] extra: pip install 'zimage-lora-studio[{name}]'"
        )
    return name


def backend_of(settings: Settings, status: dict) -> str:
    """The backend a job runs on: its own (status.json `backend`), else, for a queued job, the home's launcher;
    a started job without one ran before there were backends: local."""
    name = status.get("backend")
    if isinstance(name, str) and name:
        return name
    if status.get("state") == "queued":
        return settings.home_settings().launcher
    return "local"


def is_remote(status: dict) -> bool:
    """True for a started job that a cluster backend runs (no local PID to watch)."""
    return status.get("backend") in ("ray", "slurm")


_cache: dict[tuple, Backend] = {}


def get_backend(settings: Settings, name: str, slots=None) -> Backend:
    """The backend `name` with the home's current settings (one object per settings, so clients and job
    objects are kept); `slots` (a SlotConfig) is the local backend's."""
    check_backend(name)
    home = settings.home_settings()
    if name == "local":
        from zimage.jobs.backends.local import LocalBackend

        return LocalBackend(settings, slots)
    section = getattr(home, name)
    key = (settings.home, name, section.model_dump_json())
    backend = _cache.get(key)
    if backend is None:
        if name == "ray":
            from zimage.jobs.backends.ray_jobs import RayBackend as cls
        else:
            from zimage.jobs.backends.slurm import SlurmBackend as cls
        backend = _cache[key] = cls(settings, section)
    return backend


_health: dict[tuple, tuple[float, Health]] = {}
_checking: dict[tuple, threading.Thread] = {}
_health_lock = threading.Lock()
HEALTH_TTL_S = 10.0


def _ask(settings: Settings, name: str, key: tuple) -> None:
    try:
        result = get_backend(settings, name).health()
    except UserError as exc:
        result = Health(False, str(exc))
    except Exception as exc:  # a backend library's own error: say it, never a traceback on a page
        result = Health(False, f"{type(exc).__name__}: {exc}")
    with _health_lock:
        _health[key] = (time.monotonic(), result)
        _checking.pop(key, None)


def health(settings: Settings, name: str | None = None, wait: float = 3.0) -> tuple[str, Health]:
    """(backend name, its health) for the home's launcher or `name`, asked at most every HEALTH_TTL_S, in a
    thread: a page waits up to `wait` s for the first answer, never for a cluster that does not answer."""
    try:
        name = name or settings.home_settings().launcher
    except UserError as exc:
        return "?", Health(False, str(exc))
    key = (settings.home, name)
    with _health_lock:
        known = _health.get(key)
        thread = _checking.get(key)
        if (known is None or time.monotonic() - known[0] >= HEALTH_TTL_S) and thread is None:
            thread = _checking[key] = threading.Thread(target=_ask, args=(settings, name, key), daemon=True,
                                                       name=f"zimage-health-{name}")  # fmt: skip
            thread.start()
    if known is None and thread is not None:
        thread.join(wait)
        known = _health.get(key)
    return name, known[1] if known is not None else Health(False, f"{name}: no answer yet (asked {wait:g} s ago)")
