"""What a scheduler tick does to jobs: reap its own finished workers, mark dead ones `lost`, start queued ones.

The scheduler (scheduler.py) owns the loop, the registry and the ingest; these functions decide about
jobs from the run folders (the truth) and the ingester's index of them:
- `mark_lost`: every active run on this host whose worker process is gone (PID + start time) without
  writing a final state becomes `lost`, keeping its last step and heartbeat;
  (remote runs, which have no local PID, are zimage.jobs.remote's);
- `start_queued`: each backend (zimage.jobs.backends: local, ray, slurm) has its own line; its queued jobs
  start in line order (priority, then FIFO) while it has free slots (this host's GPU ids for local, the
  backend's capacity for a cluster; strict order: a job needing two GPUs is not overtaken); a job that can
  never run there (unknown kind, too many GPUs, a damaged config.json) fails with the reason. With a
  per-user limit (`[scheduler] user_limit`), a job of a user who already has that many active runs (here
  and on the clusters) is passed over (others' jobs start);
- `note_waiting`: each queued job's reason to wait ("waiting for a GPU", "user limit 2 reached", "behind 3
  jobs") goes into its status.json as `waiting`, written only when the reason changes.
A run whose status.json is damaged is neither marked nor started (the registry lists it as `damaged`), and
whatever goes wrong with one run is logged and skipped: the others are still reconciled and started.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

from zimage.fsio import write_json
from zimage.jobs import queue
from zimage.jobs.backends import BackendError, JobSpec, backend_of, get_backend, is_remote
from zimage.jobs.backends import local as local_backend
from zimage.jobs.launcher import process_alive, worker_identity
from zimage.jobs.slots import SlotConfig, assign
from zimage.records import Damaged
from zimage.registry.ingest import Ingester
from zimage.run_records import read_config
from zimage.runfolder import ACTIVE_STATES, RunFolder
from zimage.settings import Settings

log = logging.getLogger("zimage.jobs")

LOST_GRACE_S = 30.0  # a launched worker that never recorded a PID is given this long


def reap() -> list[str]:
    """Collect this process's finished local workers (no zombies); returns their run ids."""
    done = []
    children = local_backend.children
    for run_id, proc in list(children.items()):
        if proc.poll() is not None:
            del children[run_id]
            done.append(run_id)
    return done


def mark_lost(settings: Settings, ingester: Ingester, host: str) -> None:
    now = time.time()
    for run_id, row in list(ingester.runs.items()):
        if row.get("state") not in ACTIVE_STATES or (row.get("host") and row["host"] != host):
            continue
        if is_remote(_status(row)):
            continue  # no PID of ours: zimage.jobs.remote asks its backend
        try:
            _mark_if_lost(settings, ingester, run_id, now)
        except Exception:  # one run's trouble must not keep the others from being reconciled
            log.exception("run %s: could not check its worker; will retry", run_id)


def _mark_if_lost(settings: Settings, ingester: Ingester, run_id: str, now: float) -> None:
    folder = RunFolder(settings.runs_dir / run_id)
    rec = folder.status_or_problem()
    if isinstance(rec, Damaged) or rec.state not in ACTIVE_STATES:
        ingester.ingest_run(run_id)  # finished meanwhile, or damaged: the index says so, nothing to mark
        return
    status = folder.read_status()
    pid, started = worker_identity(folder.path, status)
    if pid is None:
        since = status.get("launched") or status.get("heartbeat") or 0.0
        if now - since < LOST_GRACE_S:
            return
    elif process_alive(pid, started):
        return
    status = folder.read_status()  # it may have written its final state as it exited
    if status.get("state") in ACTIVE_STATES:
        step = status.get("step")
        msg = f"worker process {pid or '(never started)'} ended without a final state (last step {step})"
        folder.update_status(state="lost", ended=now, last_heartbeat=status.get("heartbeat"), error=msg, lost_at=now)
        folder.log(f"scheduler: marked lost: {msg}")
        log.warning("run %s: %s", run_id, msg)
    ingester.ingest_run(run_id)


def _status(row: dict) -> dict:
    try:
        status = json.loads(row.get("status") or "{}")
    except ValueError:
        return {}
    return status if isinstance(status, dict) else {}


def _active(ingester: Ingester, host: str) -> list[dict]:
    """The statuses of the runs active now: this host's local ones and every remote one."""
    out = []
    for row in ingester.runs.values():
        if row.get("state") not in ACTIVE_STATES:
            continue
        status = {**_status(row), "state": row.get("state")}
        if is_remote(status) or not row.get("host") or row.get("host") == host:
            out.append(status)
    return out


class _LocalPool:
    """This host's GPU slots, less what its active local runs hold."""

    def __init__(self, slots: SlotConfig, active: list[dict]):
        self.slots = slots
        self.busy = [s.get("gpu_ids") or "" for s in active if not is_remote(s)]

    def full(self) -> bool:
        return len(self.busy) >= self.slots.capacity

    def refuse(self, need: int) -> str | None:
        if self.slots.gpu_ids and need > len(self.slots.gpu_ids):
            return f"needs {need} GPUs; this host offers {len(self.slots.gpu_ids)} ({self.slots.describe()})"
        return None

    def take(self, need: int) -> list[str] | None:
        gpus = assign(self.slots, self.busy, need)
        if gpus is not None:
            self.busy.append(",".join(gpus))
        return gpus

    def undo(self) -> None:
        self.busy.pop()

    def why_wait(self, need: int) -> str:
        if not self.slots.gpu_ids:
            return "waiting for a free slot"
        return "waiting for a GPU" if need == 1 else f"waiting for {need} GPUs"


class _RemotePool:
    """A cluster backend's slots (its capacity), less what the studio's active jobs there cost."""

    def __init__(self, name: str, backend, active: list[dict], error: str | None = None):
        self.name, self.backend, self.error = name, backend, error or _backoff_error(name)
        self.cap = None
        if self.error is None:
            try:
                self.cap = backend.capacity()
            except BackendError as exc:
                self.error = str(exc)
        mine = [s for s in active if s.get("backend") == name]
        self.jobs = len(mine)
        self.used = sum(self.cap.cost(s.get("gpus") or 1) for s in mine) if self.cap else 0

    def full(self) -> bool:
        cap = self.cap
        return cap is None or self.used >= cap.total or bool(cap.max_jobs and self.jobs >= cap.max_jobs)

    def refuse(self, need: int) -> str | None:
        cap = self.cap
        if cap is not None and cap.unit == "GPU" and cap.per_job is not None and need > cap.per_job:
            return f"needs {need} GPUs on one node; the largest node {cap.where} has {cap.per_job}"
        if cap is not None and cap.unit == "job" and cap.per_job is not None and need > cap.per_job:
            return f"needs {need} GPUs; [{self.name}] gpus_per_node allows {cap.per_job} per job"
        return None

    def take(self, need: int) -> list[str] | None:
        if self.cap is None:
            return None
        cost = self.cap.cost(need)
        if self.used + cost > self.cap.total or (self.cap.max_jobs and self.jobs >= self.cap.max_jobs):
            return None
        self.used, self.jobs = self.used + cost, self.jobs + 1
        return []

    def undo(self) -> None:
        pass  # a refused submission takes the backend off this tick (and backs it off): nothing to give back

    def why_wait(self, need: int) -> str:
        cap = self.cap
        if cap is None:
            return f"cannot start: {self.error}"
        if cap.unit == "GPU":
            what = "a GPU" if need == 1 else f"{need} GPUs"
            return f"waiting for {what} {cap.where} ({self.used} of {cap.total} in use by the studio)"
        return f"waiting for a free slot {cap.where} ({self.jobs} of {cap.total} jobs)"


_backoffs: dict[str, tuple[float, str]] = {}  # backend -> (monotonic time until, why): a refused submission
SUBMIT_BACKOFF_S = 30.0


def _backoff_error(name: str) -> str | None:
    until = _backoffs.get(name)
    if until is None or time.monotonic() >= until[0]:
        _backoffs.pop(name, None)
        return None
    return until[1]


def _pool(settings: Settings, name: str, slots: SlotConfig, active: list[dict]):
    if name == "local":
        return _LocalPool(slots, active)
    try:
        backend = get_backend(settings, name, slots)
    except BackendError as exc:  # not installed, or settings it cannot use: its jobs wait, saying why
        return _RemotePool(name, None, active, error=str(exc))
    return _RemotePool(name, backend, active)


def refusal(settings: Settings, name: str, need: int) -> str | None:
    """Why a job needing `need` GPUs on backend `name` would fail as soon as its turn came (more GPUs than one
    node or this host has), else None; None too while the backend cannot be asked (it would wait, not fail)."""
    from zimage.jobs.slots import slot_config

    return _pool(settings, name, slot_config(home=settings.home_settings().scheduler), []).refuse(need)


def _lines(settings: Settings, queued: list[tuple[str, dict]]) -> dict[str, list[tuple[str, dict]]]:
    """The queued jobs split into one line per backend (each in start order)."""
    lines: dict[str, list[tuple[str, dict]]] = {}
    for run_id, status in queued:
        lines.setdefault(backend_of(settings, status), []).append((run_id, status))
    return lines


def start_queued(settings: Settings, ingester: Ingester, slots: SlotConfig, host: str, user_limit: int = 0) -> None:
    queued = [(rid, {**_status(row), "state": "queued"}) for rid, row in ingester.runs.items()
              if row.get("state") == "queued"]  # fmt: skip
    if not queued:
        return
    active = _active(ingester, host)
    per_user = Counter(s.get("user") or "?" for s in active)
    for name in sorted(_lines(settings, queued)):
        pool = _pool(settings, name, slots, active)
        while not pool.full():
            try:
                run_id = _start_head(settings, name, pool, per_user, user_limit)
            except Exception:  # a disk error, say: the next tick tries again; nothing else of this tick is lost
                log.exception("could not start the next queued %s job; will retry", name)
                break
            if run_id is None:
                break
            try:
                ingester.ingest_run(run_id)
            except Exception:
                log.exception("ingest of run %s failed; will retry", run_id)


def _start_head(settings: Settings, name: str, pool, per_user: Counter, user_limit: int) -> str | None:
    """Start (or fail, with the reason) the first job in `name`'s line whose user is under the limit; its run
    id, or None when nothing more can start there now."""
    with queue.queue_lock(settings):
        line = queue.queued_runs(settings)  # the truth, not the index: the CLI may have moved jobs
        line = [(rid, st) for rid, st in line if backend_of(settings, st) == name]
        line = [(rid, st) for rid, st in line if not user_limit or per_user[st.get("user") or "?"] < user_limit]
        if not line:
            return None
        run_id, status = line[0]
        need = status.get("gpus") or 1
        kind = status.get("kind")
        folder = RunFolder(settings.runs_dir / run_id)
        config = read_config(folder.config_path)
        if kind not in queue.KINDS:
            folder.update_status(state="failed", error=f"kind {kind!r} is not a job kind", ended=time.time())
        elif isinstance(config, Damaged) or config is None:
            # The worker would stop at its first read of it; say why now, without taking a slot.
            problem = config.problem if config is not None else "config.json: missing"
            folder.update_status(state="failed", error=f"{problem}; the job cannot start", ended=time.time())
            folder.log(f"scheduler: not started: {problem}")
        elif (why := pool.refuse(need)) is not None:
            folder.update_status(state="failed", ended=time.time(), error=why)
        else:
            gpus = pool.take(need)
            if gpus is None:
                return None
            spec = JobSpec(run_id, folder.path, kind, need, status.get("user"), tuple(gpus))
            if not _submit(settings, name, pool, folder, spec, status.get("backend")):
                pool.undo()
                return None
            per_user[status.get("user") or "?"] += 1
    return run_id


def _submit(settings: Settings, name: str, pool, folder: RunFolder, spec: JobSpec, own: str | None) -> bool:
    """Hand one job to its backend; False when it did not go (the job stays queued, saying why). `own` is the
    backend the job itself named (None: the home's launcher, which it keeps following)."""
    if name == "local":
        if (folder.read_status() or {}).get("waiting"):
            folder.update_status(waiting=None)  # before the worker exists: nobody else writes the file
        try:
            get_backend(settings, "local", pool.slots).submit(spec)
        except OSError:
            log.exception("could not start %s", spec.run_id)
            return False
        log.info("started %s (%s) on %s", spec.run_id, spec.kind, ",".join(spec.gpu_ids) or "CPU")
        return True
    backend = pool.backend
    now = time.time()
    planned = backend.plan(spec) if hasattr(backend, "plan") else None
    blank = {"backend_job_id": None, "backend_log": None, "backend_address": None}
    # Everything the scheduler writes to status.json comes before the worker can exist (it writes the file
    # from then on); the handle of a submission that returns later goes to launch.json, the scheduler's.
    fields = {**blank, **(planned.fields() if planned else {}), "backend": name}
    folder.update_status(state="starting", launched=now, waiting=None, gpu_ids="", pid=None, pid_start_time=None,
                         error=None, ended=None, **fields)  # fmt: skip
    try:
        handle = backend.submit(spec)
    except BackendError as exc:
        _backoffs[name] = (time.monotonic() + SUBMIT_BACKOFF_S, str(exc))
        folder.update_status(state="queued", backend=own, launched=None, waiting=f"cannot start: {exc}", **blank)
        folder.log(f"scheduler: not submitted to {name}: {exc}")
        log.warning("run %s: not submitted to %s: %s", spec.run_id, name, exc)
        return False
    write_json(folder.path / "launch.json", {**handle.fields(), "launched": now, "gpus": spec.gpus, "kind": spec.kind})
    folder.log(f"scheduler: submitted to {name} as job {handle.job_id} (log: {handle.log})")
    log.info("started %s (%s) on %s as job %s", spec.run_id, spec.kind, name, handle.job_id)
    return True


def waiting_reasons(settings: Settings, queued: list[tuple[str, dict]], pools: dict, per_user: Counter,
                    user_limit: int) -> dict[str, str]:  # fmt: skip
    """run id -> why it has not started, for the queued jobs in line order, after this tick's starts: the
    user's limit, else its backend's lack of a slot for the first job that could start there, else the jobs
    ahead of it in that backend's line. `pools` maps a backend name to its pool (built on demand)."""
    out: dict[str, str] = {}
    for name, line in _lines(settings, queued).items():
        ahead = 0
        for run_id, status in line:
            if user_limit and per_user[status.get("user") or "?"] >= user_limit:
                out[run_id] = f"user limit {user_limit} reached"
            elif ahead:
                out[run_id] = f"behind {ahead} job{'s' if ahead > 1 else ''}"
                ahead += 1
            else:
                out[run_id] = pools[name].why_wait(status.get("gpus") or 1)
                ahead = 1
    return out


class _Pools(dict):
    def __init__(self, settings: Settings, slots: SlotConfig, active: list[dict]):
        super().__init__()
        self.args = (settings, slots, active)

    def __missing__(self, name: str):
        settings, slots, active = self.args
        pool = self[name] = _pool(settings, name, slots, active)
        return pool


def note_waiting(settings: Settings, ingester: Ingester, slots: SlotConfig, host: str, user_limit: int = 0) -> None:
    """Write each queued job's reason to wait into its status.json, only where the index shows another."""
    queued = [(rid, _status(row)) for rid, row in ingester.runs.items() if row.get("state") == "queued"]
    if not queued:
        return
    queued.sort(key=lambda item: queue.line_key(*item))
    active = _active(ingester, host)
    per_user = Counter(s.get("user") or "?" for s in active)
    known = dict(queued)
    queued = [(rid, {**st, "state": "queued"}) for rid, st in queued]
    reasons = waiting_reasons(settings, queued, _Pools(settings, slots, active), per_user, user_limit)
    changed = {rid: why for rid, why in reasons.items() if known[rid].get("waiting") != why}
    for run_id, why in changed.items():
        try:
            with queue.queue_lock(settings):
                folder = RunFolder(settings.runs_dir / run_id)
                rec = folder.status_or_problem()
                if not isinstance(rec, Damaged) and rec.state == "queued":  # not started or cancelled meanwhile
                    folder.update_status(waiting=why)
            ingester.ingest_run(run_id)
        except Exception:  # one run's trouble must not keep the others' reasons from being written
            log.exception("run %s: could not record why it waits; will retry", run_id)
