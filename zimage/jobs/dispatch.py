"""What a scheduler tick does to jobs: reap its own finished workers, mark dead ones `lost`, start queued ones.

The scheduler (scheduler.py) owns the loop, the registry and the ingest; these functions decide about
jobs from the run folders (the truth) and the ingester's index of them:
- `mark_lost`: every active run on this host whose worker process is gone (PID + start time) without
  writing a final state becomes `lost`, keeping its last step and heartbeat;
- `start_queued`: queued jobs start in line order (priority, then FIFO) while GPU slots are free (strict
  order: a job needing two GPUs is not overtaken); a job that can never run here (unknown kind, too many
  GPUs, a damaged config.json) fails with the reason. With a per-user limit (`[scheduler] user_limit`), a
  job of a user who already has that many active runs on this host is passed over (others' jobs start);
- `note_waiting`: each queued job's reason to wait ("waiting for a GPU", "user limit 2 reached", "behind 3
  jobs") goes into its status.json as `waiting`, written only when the reason changes.
A run whose status.json is damaged is neither marked nor started (the registry lists it as `damaged`), and
whatever goes wrong with one run is logged and skipped: the others are still reconciled and started.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections import Counter

from zimage.jobs import queue
from zimage.jobs.launcher import launch, process_alive, worker_identity
from zimage.jobs.slots import SlotConfig, assign
from zimage.records import Damaged
from zimage.registry.ingest import Ingester
from zimage.run_records import read_config
from zimage.runfolder import ACTIVE_STATES, RunFolder
from zimage.settings import Settings

log = logging.getLogger("zimage.jobs")

LOST_GRACE_S = 30.0  # a launched worker that never recorded a PID is given this long

_children: dict[str, subprocess.Popen] = {}  # this process's workers, polled so none stays a zombie


def reap() -> list[str]:
    """Collect this process's finished workers (no zombies); returns their run ids."""
    done = []
    for run_id, proc in list(_children.items()):
        if proc.poll() is not None:
            del _children[run_id]
            done.append(run_id)
    return done


def mark_lost(settings: Settings, ingester: Ingester, host: str) -> None:
    now = time.time()
    for run_id, row in list(ingester.runs.items()):
        if row.get("state") not in ACTIVE_STATES or (row.get("host") and row["host"] != host):
            continue
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


def start_queued(settings: Settings, ingester: Ingester, slots: SlotConfig, host: str, user_limit: int = 0) -> None:
    if not any(r.get("state") == "queued" for r in ingester.runs.values()):
        return
    busy, per_user = _load(ingester, host)
    while len(busy) < slots.capacity:
        try:
            run_id = _start_head(settings, slots, busy, per_user, user_limit)
        except Exception:  # a disk error, say: the next tick tries again; nothing else of this tick is lost
            log.exception("could not start the next queued job; will retry")
            return
        if run_id is None:
            return
        try:
            ingester.ingest_run(run_id)
        except Exception:
            log.exception("ingest of run %s failed; will retry", run_id)


def _load(ingester: Ingester, host: str) -> tuple[list[str], Counter]:
    """The gpu_ids of the active runs on this host, and how many of them each user has."""
    active = [
        r for r in ingester.runs.values()
        if r.get("state") in ACTIVE_STATES and (not r.get("host") or r.get("host") == host)
    ]  # fmt: skip
    return [r.get("gpu_ids") or "" for r in active], Counter(r.get("user_name") or "?" for r in active)


def _start_head(
    settings: Settings, slots: SlotConfig, busy: list[str], per_user: Counter, user_limit: int
) -> str | None:
    """Start (or fail, with the reason) the first job in line whose user is under the limit; its run id,
    or None when nothing more can start now."""
    with queue.queue_lock(settings):
        line = queue.queued_runs(settings)  # the truth, not the index: the CLI may have moved jobs
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
        elif slots.gpu_ids and need > len(slots.gpu_ids):
            folder.update_status(
                state="failed",
                ended=time.time(),
                error=f"needs {need} GPUs; this host offers {len(slots.gpu_ids)} ({slots.describe()})",
            )
        else:
            gpus = assign(slots, busy, need)
            if gpus is None:
                return None
            busy.append(",".join(gpus))
            if status.get("waiting"):
                folder.update_status(waiting=None)  # before the worker exists: nobody else writes the file
            try:
                _children[run_id] = launch(settings, run_id, kind, gpus)
                per_user[status.get("user") or "?"] += 1
                log.info("started %s (%s) on %s", run_id, kind, ",".join(gpus) or "CPU")
            except OSError:
                log.exception("could not start %s", run_id)
                busy.pop()
    return run_id


def waiting_reasons(
    queued: list[tuple[str, dict]], slots: SlotConfig, busy: list[str], per_user: Counter, user_limit: int
) -> dict[str, str]:
    """run id -> why it has not started, for the queued jobs in line order, after this tick's starts: the
    user's limit, else no free slot for the first job that could start, else the jobs ahead of it."""
    out, ahead = {}, 0
    for run_id, status in queued:
        if user_limit and per_user[status.get("user") or "?"] >= user_limit:
            out[run_id] = f"user limit {user_limit} reached"
        elif ahead:
            out[run_id] = f"behind {ahead} job{'s' if ahead > 1 else ''}"
            ahead += 1
        else:
            need = status.get("gpus") or 1
            if not slots.gpu_ids:
                out[run_id] = "waiting for a free slot"
            else:
                out[run_id] = "waiting for a GPU" if need == 1 else f"waiting for {need} GPUs"
            ahead = 1
    return out


def note_waiting(settings: Settings, ingester: Ingester, slots: SlotConfig, host: str, user_limit: int = 0) -> None:
    """Write each queued job's reason to wait into its status.json, only where the index shows another."""
    queued = []
    for run_id, row in ingester.runs.items():
        if row.get("state") == "queued":
            try:
                status = json.loads(row.get("status") or "{}")
            except ValueError:
                continue
            queued.append((run_id, status if isinstance(status, dict) else {}))
    if not queued:
        return
    queued.sort(key=lambda item: queue.line_key(*item))
    busy, per_user = _load(ingester, host)
    known = dict(queued)
    reasons = waiting_reasons(queued, slots, busy, per_user, user_limit)
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
