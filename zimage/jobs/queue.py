"""The job queue, kept in the run folders themselves (DESIGN.md section 2).

A queued job is a run folder whose status.json says `state: "queued"`; its place in line is the number
`queue_order` in that file, after its `priority` (high, normal, low: higher first; a job without one is
normal). Every change to the line (enqueue, move up/down, cancel, the scheduler taking
the head) happens under one host-wide lock file, `registry/queue.lock` (filelock), so the app, the CLI and
`zimage worker` can all change the queue at the same time without a database and without losing a job.
The registry database only mirrors these files.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from zimage.errors import UserError
from zimage.fsio import atomic_folder
from zimage.records import Damaged
from zimage.run_records import status_fields
from zimage.runfolder import FINAL_STATES, RunFolder
from zimage.settings import Settings

KINDS = ("train", "caption", "testgrid")
PRIORITIES = ("high", "normal", "low")  # start order: every high job before any normal one, then low
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # ours, and `zimage train`'s own folder names


class JobError(UserError):
    """A queue or run request that cannot be done (unknown run, wrong state, bad kind)."""


def check_run_id(run_id: str) -> str:
    """A run id is a plain folder name under registry/runs; paths and '..' are refused."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise JobError(f"run id {run_id!r} is not a run id (expected e.g. 20261129-225012-my-lora-1a2b)")
    return run_id


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")
    return slug or "run"


def new_run_id(label: str, now: float | None = None) -> str:
    """`YYYYMMDD-HHMMSS-<slug of label>-<4 hex>`: sorts by creation time, safe as a folder name."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{stamp}-{_slug(label)}-{secrets.token_hex(2)}"


def run_folder(settings: Settings, run_id: str) -> RunFolder:
    """The RunFolder of an existing run; a clear error if there is none."""
    folder = RunFolder(settings.runs_dir / check_run_id(run_id))
    if not folder.status_path.exists():
        raise JobError(f"run {run_id}: no such run in {settings.runs_dir}")
    return folder


@contextmanager
def queue_lock(settings: Settings) -> Iterator[None]:
    """Host-wide exclusive lock around every change to the queue (held for milliseconds)."""
    settings.registry_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(settings.registry_dir / "queue.lock", thread_local=False):
        yield


def run_dirs(settings: Settings) -> list[Path]:
    """Run folders in id order; hidden folders (being created or deleted) are skipped."""
    if not settings.runs_dir.is_dir():
        return []
    return sorted(p for p in settings.runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_priority(priority) -> str:
    """A job's priority as given (the CLI, the Train page); a clear error naming the field if it is not one."""
    if priority not in PRIORITIES:
        raise JobError(f"priority: {priority!r} is not a priority; allowed: {', '.join(PRIORITIES)}")
    return priority


def priority_rank(status: dict) -> int:
    """0 for high, 1 for normal, 2 for low; a missing or unknown value (a hand-edited file) counts as normal."""
    value = status.get("priority")
    return PRIORITIES.index(value) if value in PRIORITIES else 1


def line_key(run_id: str, status: dict) -> tuple:
    """The place of a queued job in line: priority, then queue_order, then run id."""
    return (priority_rank(status), status.get("queue_order") or 0.0, run_id)


def queued_runs(settings: Settings) -> list[tuple[str, dict]]:
    """(run_id, status) of every queued job, first in line first (read from the folders). A run whose
    status.json is damaged is not in line: it is listed as damaged (runinfo.damaged_runs), never started."""
    out = []
    for path in run_dirs(settings):
        rec = RunFolder(path).status_or_problem()
        if not isinstance(rec, Damaged) and rec.state == "queued":
            out.append((path.name, status_fields(rec)))
    out.sort(key=lambda item: line_key(*item))
    return out


def _next_order(settings: Settings) -> float:
    # Strictly after everything in line, even if the clock steps back.
    last = max((s.get("queue_order") or 0.0 for _, s in queued_runs(settings)), default=0.0)
    return max(time.time(), last + 1e-3)


def enqueue(
    settings: Settings,
    kind: str,
    config: dict,
    user: str | None = None,
    name: str | None = None,
    gpus: int = 1,
    actor=None,
    priority: str | None = None,
    backend: str | None = None,
) -> str:
    """Put a job at the end of the queue and return its run id at once; the scheduler starts it.

    `actor` (a zimage.auth.Actor) is who launches it: a viewer is refused, and outside auth mode none
    the run's `user` is the actor's name whatever `user` says. The launch is an event in events.jsonl.

    Writes `runs/<run_id>/config.json` and `status.json` (state "queued", kind, user, name, created,
    queue_order). The folder is built under a hidden name and renamed into place, so nobody ever
    sees a run without its config. `gpus` is how many GPUs the job needs (a CPU-only host runs it alone).
    `priority` (high, normal, low) is kept in status.json; without one, the home's `[scheduler]
    default_priority` (settings.toml) applies. `backend` (local, ray, slurm) is where it runs; without one,
    the home's `launcher` at the time it starts.
    """
    if kind not in KINDS:
        raise JobError(f"kind: {kind!r} is not a job kind; allowed: {', '.join(KINDS)}")
    if not isinstance(config, dict):
        raise JobError("config: must be a mapping of settings")
    if not isinstance(gpus, int) or gpus < 1:
        raise JobError(f"gpus: {gpus!r} must be a whole number of at least 1")
    priority = check_priority(priority) if priority is not None else settings.home_settings().scheduler.default_priority
    if backend is not None:
        from zimage.jobs.backends import check_backend

        backend = check_backend(backend)
    from zimage.auth import auth_mode, checked, default_actor
    from zimage.jobs.users import check_user_name, os_user

    who = default_actor(settings, actor, user)
    if auth_mode(settings) != "none":
        user = who.name  # a team home: the signed-in name, whatever the caller typed
    elif user is not None and str(user).strip():  # mode none: the name given, as always
        who = dataclasses.replace(who, name=check_user_name(user))
    user = check_user_name(user) if user is not None and str(user).strip() else os_user()
    verb, owner = "create", user
    if kind == "caption" and isinstance(config.get("dataset"), str):  # captions rewrite a dataset: its owner's call
        from zimage.data.ownership import on_dataset_name

        verb, owner = "edit", on_dataset_name(settings, config["dataset"])[2]
    with checked(settings, who, f"{kind}.launch", "run:(new)", owner=owner, verb=verb) as note:
        run_id = _enqueue(settings, kind, config, user, name, gpus, priority, backend)
        note.update(detail=f"queued {name or run_id}", folder=settings.runs_dir / run_id, target=f"run:{run_id}")
    return run_id


def _enqueue(
    settings: Settings, kind: str, config: dict, user: str, name: str | None, gpus: int, priority: str, backend: str | None
) -> str:
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise JobError(f"config: cannot be saved as JSON ({exc})") from None
    label = name or str(config.get("output_name") or "") or kind
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    with queue_lock(settings):
        for _ in range(20):
            run_id = new_run_id(label)
            if not (settings.runs_dir / run_id).exists():
                break
        else:  # pragma: no cover - 65536 ids per second per label
            raise JobError("could not find a free run id; try again")
        with atomic_folder(settings.runs_dir / run_id) as tmp:  # the run appears whole, or not at all
            folder = RunFolder(tmp)
            folder.write_config(config)
            folder.update_status(
                state="queued",
                kind=kind,
                user=user,
                name=name or label,
                created=time.time(),
                queue_order=_next_order(settings),
                gpus=gpus,
                priority=priority,
                **({"backend": backend} if backend else {}),
                host=socket.gethostname(),
                step=0,
            )
    return run_id


def move(settings: Settings, run_id: str, offset: int) -> int:
    """Move a queued job `offset` places (-1 = up, +1 = down) among the jobs of its priority (a normal job
    does not pass a high one: that takes a higher priority); returns its new 0-based position."""
    check_run_id(run_id)
    with queue_lock(settings):
        line = queued_runs(settings)
        ids = [rid for rid, _ in line]
        if run_id not in ids:
            raise JobError(f"run {run_id}: not in the queue (only queued jobs can be moved)")
        old = ids.index(run_id)
        same = [i for i, (_, s) in enumerate(line) if priority_rank(s) == priority_rank(line[old][1])]
        new = min(max(old + offset, same[0]), same[-1])  # the line is sorted by priority: `same` is one span
        if new == old:
            return old
        orders = [s.get("queue_order") or 0.0 for _, s in line]
        ids.insert(new, ids.pop(old))
        # Reuse the same set of order numbers, so nothing outside the moved span changes.
        lo, hi = min(old, new), max(old, new)
        for i in range(lo, hi + 1):
            RunFolder(settings.runs_dir / ids[i]).update_status(queue_order=orders[i])
        return new


def cancel(settings: Settings, run_id: str) -> None:
    """Take a queued job out of the line; its folder stays, with state "stopped" and `cancelled: true`."""
    folder = run_folder(settings, run_id)
    with queue_lock(settings):
        state = folder.checked_status().get("state")
        if state != "queued":
            raise JobError(f"run {run_id}: is {state}, not queued; use stop for a started run")
        folder.update_status(state="stopped", cancelled=True, ended=time.time())


def requeue(settings: Settings, run_id: str, user: str | None = None, checkpoint: str | None = None) -> None:
    """Put a stopped, failed or lost run back in line; the worker resumes from its newest complete
    checkpoint, or from `checkpoint` (a name such as step-000040) when given.

    Every request in control.json so far counts as handled (the stop that ended the run, or one its
    worker never saw), so none of them acts on the resumed run.
    """
    folder = run_folder(settings, run_id)
    if checkpoint:
        from zimage.training.checkpoints import checkpoint_report  # verifies manifests: only on this request

        report = {name: (ok, why) for name, _step, ok, why in checkpoint_report(folder.checkpoints_dir)}
        if checkpoint not in report:
            known = ", ".join(report) or "none"
            raise JobError(f"checkpoint: run {run_id} has no checkpoint {checkpoint!r} (it has: {known})")
        if not report[checkpoint][0]:
            raise JobError(f"checkpoint: {checkpoint} of run {run_id} cannot be resumed from: {report[checkpoint][1]}")
    with queue_lock(settings):
        status = folder.checked_status()
        if status.get("state") not in FINAL_STATES or status.get("state") == "completed":
            raise JobError(f"run {run_id}: is {status.get('state')}; only stopped, failed or lost runs can be resumed")
        folder.retire_control()
        folder.update_status(
            state="queued",
            queue_order=_next_order(settings),
            resume=True,
            resume_checkpoint=checkpoint or None,
            resumes=(status.get("resumes") or 0) + 1,
            requeued_by=user or status.get("user"),
            cancelled=False,
            ended=None,
            error=None,
        )
