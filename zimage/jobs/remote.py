"""Watching the runs a cluster backend runs (ray, slurm), where there is no local PID to check.

Each tick, the scheduler asks the backend about every active remote run (at most every POLL_EVERY_S each):
- the backend says the job ended (finished, failed, stopped, cancelled) and the worker wrote no final state:
  the run becomes `lost` ("the ray job … ended (Ray: FAILED (…)) without the worker writing a final
  state"), or `stopped` when a stop request was pending (a cancel after the grace period, say);
- the backend says it runs but the worker's heartbeat is older than `[scheduler] heartbeat_timeout_s` (a
  hung node, a stopped process): the run becomes `lost`, and the job is cancelled through the backend so it
  frees its slot; the same when the backend cannot tell (unreachable, or it forgot the job) and the
  heartbeat is that old, or when no worker ever started that long after the submission;
- a stop request (control.json) that the worker has not answered within `[scheduler] stop_grace_s`: the job
  is cancelled through the backend, once.
Each keeps the run's last step and heartbeat, and puts the backend's job id and log location into
status.json. Whatever goes wrong with one run is logged; the others are still checked.
"""

from __future__ import annotations

import json
import logging
import time

from zimage.errors import UserError
from zimage.jobs.backends import BackendError, Handle, Poll, cancel_late, get_backend, is_remote
from zimage.records import Damaged
from zimage.registry.ingest import Ingester
from zimage.run_records import read_launch
from zimage.runfolder import ACTIVE_STATES, RunFolder
from zimage.settings import SchedulerSettings, Settings

log = logging.getLogger("zimage.jobs")

POLL_EVERY_S = 3.0
NEVER_SUBMITTED_S = 60.0  # `starting` with a backend but no handle anywhere: the submission never happened

_last_poll: dict[str, float] = {}
_cancelled: dict[str, float] = {}  # run id -> when its job was cancelled through the backend (once per launch)


def handle_of(folder: RunFolder, status: dict) -> Handle | None:
    """The backend's handle of the run's current launch: launch.json (the scheduler's), else status.json."""
    rec = read_launch(folder.path / "launch.json")
    if rec is not None and not isinstance(rec, Damaged):
        data = {**(rec.model_extra or {}), "launched": rec.launched}
        if (data.get("launched") or 0.0) >= (status.get("launched") or 0.0) - 1:
            handle = Handle.from_fields(data)
            if handle is not None:
                return handle
    return Handle.from_fields(status)


def reconcile(settings: Settings, ingester: Ingester) -> None:
    try:
        limits = settings.home_settings().scheduler
    except UserError:
        limits = SchedulerSettings()  # a broken settings.toml must not stop the watching
    now = time.time()
    for run_id, row in list(ingester.runs.items()):
        if row.get("state") not in ACTIVE_STATES:
            continue
        try:
            status = json.loads(row.get("status") or "{}")
        except ValueError:
            continue
        if not isinstance(status, dict) or not is_remote(status):
            continue
        if now - _last_poll.get(run_id, 0.0) < POLL_EVERY_S:
            continue
        _last_poll[run_id] = now
        try:
            _check(settings, ingester, run_id, limits, now)
        except Exception:  # one run's trouble must not keep the others from being checked
            log.exception("run %s: could not ask its backend; will retry", run_id)
    for run_id in cancel_late(lambda rid: RunFolder(settings.runs_dir / rid).read_status().get("state")):
        RunFolder(settings.runs_dir / run_id).log("scheduler: a late submission's job was cancelled: the run no "
                                                  "longer waits for it")  # fmt: skip


def _check(settings: Settings, ingester: Ingester, run_id: str, limits: SchedulerSettings, now: float) -> None:
    folder = RunFolder(settings.runs_dir / run_id)
    rec = folder.status_or_problem()
    if isinstance(rec, Damaged) or rec.state not in ACTIVE_STATES:
        ingester.ingest_run(run_id)
        return
    status = folder.read_status()
    name = status.get("backend")
    handle = handle_of(folder, status)
    if handle is None:
        if now - (status.get("launched") or 0.0) > NEVER_SUBMITTED_S:
            _end(folder, status, None, "lost", f"no {name} job was recorded for it: it was never submitted")
            ingester.ingest_run(run_id)
        return
    try:
        backend = get_backend(settings, name)
    except BackendError as exc:
        backend, poll = None, Poll("unknown", str(exc))
    else:
        poll = backend.poll(handle)
    stop_at = _pending_stop(folder)
    what = f"the {name} job {handle.job_id}"
    if poll.state in ("finished", "failed"):
        status = folder.read_status()  # it may have written its final state as it exited
        if status.get("state") in ACTIVE_STATES:
            if stop_at is not None:
                _end(folder, status, handle, "stopped", f"{what} ended ({poll.detail}) after a stop request; "
                                                        "the worker wrote no final state")  # fmt: skip
            else:
                _end(folder, status, handle, "lost", f"{what} ended ({poll.detail}) without the worker writing a "
                                                     f"final state (last step {status.get('step')})")  # fmt: skip
        ingester.ingest_run(run_id)
        return
    started = (status.get("started") or 0.0) >= (status.get("launched") or 0.0) - 1 and status.get("started")
    age = now - (status.get("heartbeat") or 0.0)
    if started and age > limits.heartbeat_timeout_s:
        says = "says the job runs" if poll.state == "running" else f"cannot tell ({poll.detail})"
        _end(folder, status, handle, "lost", f"the worker's heartbeat is {age:.0f} s old while {name} {says} (a hung "
                                             f"node?); {what} is cancelled (last step {status.get('step')})")  # fmt: skip
        _cancel(folder, backend if poll.state == "running" else None, handle)
        ingester.ingest_run(run_id)
        return
    if not started and poll.state == "unknown" and now - (status.get("launched") or 0.0) > limits.heartbeat_timeout_s:
        # Submitted (or so we hoped) long ago, no worker ever started, and the backend does not know the job.
        _end(folder, status, handle, "lost", f"{what} never started and {name} cannot tell about it ({poll.detail})")
        ingester.ingest_run(run_id)
        return
    if stop_at is not None and now - stop_at > limits.stop_grace_s and run_id not in _cancelled:
        _cancelled[run_id] = now
        folder.log(f"scheduler: the worker did not stop within {limits.stop_grace_s:g} s; cancelling {what}")
        _cancel(folder, backend, handle)


def _pending_stop(folder: RunFolder) -> float | None:
    """When the oldest stop request the run's workers have not acted on was made; None if there is none."""
    done = set(folder.handled_control())
    times = [r.get("at") or 0.0 for r in folder.read_control() if r.get("action") == "stop" and r.get("id") not in done]
    return min(times) if times else None


def _cancel(folder: RunFolder, backend, handle: Handle) -> None:
    if backend is None:
        return
    try:
        backend.cancel(handle)
    except BackendError as exc:
        folder.log(f"scheduler: {exc}")
        log.warning("%s", exc)


def _end(folder: RunFolder, status: dict, handle: Handle | None, state: str, msg: str) -> None:
    now = time.time()
    fields = handle.fields() if handle is not None else {}
    folder.update_status(state=state, ended=now, last_heartbeat=status.get("heartbeat"), error=msg,
                         **({"lost_at": now} if state == "lost" else {}), **fields)  # fmt: skip
    folder.log(f"scheduler: marked {state}: {msg}")
    log.warning("run %s: %s", folder.path.name, msg)
