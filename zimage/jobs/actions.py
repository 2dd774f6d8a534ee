"""What a person can do to a run, from a page or the CLI: control, move, cancel, resume, delete.

Everything works through the run folders (control.json, status.json under the queue lock), so it works
from any process while the app holds the database. When this process runs the scheduler, the changed
run is re-read into the registry at once, so the page that pressed the button shows the effect.

Each function takes the acting user (`actor=`, a zimage.auth.Actor; see zimage.auth.default_actor for a
call without one): a member may act only on their own runs (the run's `user` in status.json), an admin on
anyone's, a viewer on none. Every attempt, refused or done, is an event in events.jsonl (the home's and
the run's).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time

from zimage.auth import Actor, auth_mode, checked, default_actor
from zimage.jobs import queue as _queue
from zimage.jobs.queue import JobError, move, queue_lock, requeue, run_folder
from zimage.jobs.users import check_user_name
from zimage.records import Damaged
from zimage.runfolder import ACTIVE_STATES, CONTROL_ACTIONS
from zimage.settings import Settings


def _refresh(settings: Settings, run_id: str) -> None:
    scheduler = sys.modules.get("zimage.jobs.scheduler")
    if scheduler is not None:
        scheduler.refresh_run(settings, run_id)


def _owner(folder) -> str | None:
    rec = folder.status_or_problem()
    if isinstance(rec, Damaged):  # the owner as the damaged file still says it; unknown: only an admin may act
        return (rec.data or {}).get("user") if isinstance(rec.data, dict) else None
    return rec.user


def _guarded(settings: Settings, run_id: str, verb: str, event: str, actor: Actor | None, user: str | None = None):
    folder = run_folder(settings, run_id)
    who = default_actor(settings, actor, user)
    if auth_mode(settings) == "none" and user and str(user).strip():  # mode none: the name given is who acts
        who = dataclasses.replace(who, name=check_user_name(user))
    guard = checked(settings, who, event, f"run:{run_id}", _owner(folder), folder.path, what=f"run {run_id}", verb=verb)
    return who, guard


def control(
    settings: Settings,
    run_id: str,
    action: str,
    user: str | None = None,
    checkpoint: str | None = None,
    actor: Actor | None = None,
) -> str:
    """Send `action` (stop, pause, resume, save_now, sample_now) to a run; returns what was done.

    stop on a queued job cancels it; resume on a stopped, failed or lost run puts it back in line
    (the worker continues from its newest complete checkpoint, or `checkpoint`). Anything else needs a
    running worker.
    """
    if action not in CONTROL_ACTIONS:
        raise JobError(f"action: {action!r} is not one of {', '.join(CONTROL_ACTIONS)}")
    who, guard = _guarded(settings, run_id, "control", f"run.{action}", actor, user)
    if auth_mode(settings) != "none" or (actor is not None and not user):  # mode none: the name given, as before
        user = who.name
    with guard as note:
        folder = run_folder(settings, run_id)
        state = folder.checked_status().get("state")  # a damaged status.json: the error names the file and field
        if state == "queued" and action == "stop":
            _queue.cancel(settings, run_id)
            done = "cancelled"
        elif state in ("stopped", "failed", "lost") and action == "resume":
            requeue(settings, run_id, user=user, checkpoint=checkpoint)
            done = "requeued"
        elif state in ACTIVE_STATES:
            if action == "pause" and state == "stopping":
                raise JobError(f"run {run_id}: is stopping; it cannot be paused")
            folder.send_control(action, user=user)
            done = {"stop": "stop requested", "pause": "pause requested", "resume": "resume requested"}.get(
                action, f"{action} requested"
            )
        else:
            raise JobError(f"run {run_id}: is {state}; {action} needs a running run")
        note["detail"] = done
    _refresh(settings, run_id)
    return done


def cancel(settings: Settings, run_id: str, actor: Actor | None = None) -> None:
    """Take a queued job out of the line (state "stopped", `cancelled: true`); its folder stays."""
    with _guarded(settings, run_id, "control", "run.cancel", actor)[1] as note:
        _queue.cancel(settings, run_id)
        note["detail"] = "cancelled"
    _refresh(settings, run_id)


def _move(settings: Settings, run_id: str, offset: int, actor: Actor | None) -> int:
    with _guarded(settings, run_id, "reorder", "run.move", actor)[1] as note:
        pos = move(settings, run_id, offset)
        note["detail"] = f"{'up' if offset < 0 else 'down'} to position {pos + 1}"
    _refresh(settings, run_id)
    return pos


def move_up(settings: Settings, run_id: str, actor: Actor | None = None) -> int:
    """Move a queued job one place towards the head; returns its new 0-based position."""
    return _move(settings, run_id, -1, actor)


def move_down(settings: Settings, run_id: str, actor: Actor | None = None) -> int:
    """Move a queued job one place towards the tail; returns its new 0-based position."""
    return _move(settings, run_id, +1, actor)


def delete_run(settings: Settings, run_id: str, actor: Actor | None = None) -> None:
    """Delete a finished or queued run's folder (samples, checkpoints, logs); exported LoRAs stay.

    A started run must be stopped first. A run whose status.json is damaged can be deleted: its state is
    unknown, and deleting it is the way out besides mending the file by hand. The folder is renamed to a
    hidden name in one step and then removed, so no reader ever sees half a run.
    """
    folder = run_folder(settings, run_id)
    with _guarded(settings, run_id, "delete", "run.delete", actor)[1] as note, queue_lock(settings):
        rec = folder.status_or_problem()
        state = None if isinstance(rec, Damaged) else rec.state
        if state in ACTIVE_STATES:
            raise JobError(f"run {run_id}: is {state}; stop it before deleting")
        trash = settings.runs_dir / f".deleted-{run_id}-{int(time.time() * 1000)}"
        os.rename(folder.path, trash)
        note["detail"], note["folder"] = "deleted", None  # the folder is gone: the home's events.jsonl keeps it
    shutil.rmtree(trash, ignore_errors=True)
    _refresh(settings, run_id)
