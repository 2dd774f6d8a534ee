"""What a person can do to a run, from a page or the CLI: control, move, cancel, resume, delete.

Everything works through the run folders (control.json, status.json under the queue lock), so it works
from any process while the app holds the database. When this process runs the scheduler, the changed
run is re-read into the registry at once, so the page that pressed the button shows the effect.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from zimage.jobs import queue as _queue
from zimage.jobs.queue import JobError, move, queue_lock, requeue, run_folder
from zimage.records import Damaged
from zimage.runfolder import ACTIVE_STATES, CONTROL_ACTIONS
from zimage.settings import Settings


def _refresh(settings: Settings, run_id: str) -> None:
    scheduler = sys.modules.get("zimage.jobs.scheduler")
    if scheduler is not None:
        scheduler.refresh_run(settings, run_id)


def control(
    settings: Settings, run_id: str, action: str, user: str | None = None, checkpoint: str | None = None
) -> str:
    """Send `action` (stop, pause, resume, save_now, sample_now) to a run; returns what was done.

    stop on a queued job cancels it; resume on a stopped, failed or lost run puts it back in line
    (the worker continues from its newest complete checkpoint, or `checkpoint`). Anything else needs a
    running worker.
    """
    if action not in CONTROL_ACTIONS:
        raise JobError(f"action: {action!r} is not one of {', '.join(CONTROL_ACTIONS)}")
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
    _refresh(settings, run_id)
    return done


def cancel(settings: Settings, run_id: str) -> None:
    """Take a queued job out of the line (state "stopped", `cancelled: true`); its folder stays."""
    _queue.cancel(settings, run_id)
    _refresh(settings, run_id)


def move_up(settings: Settings, run_id: str) -> int:
    """Move a queued job one place towards the head; returns its new 0-based position."""
    pos = move(settings, run_id, -1)
    _refresh(settings, run_id)
    return pos


def move_down(settings: Settings, run_id: str) -> int:
    """Move a queued job one place towards the tail; returns its new 0-based position."""
    pos = move(settings, run_id, +1)
    _refresh(settings, run_id)
    return pos


def delete_run(settings: Settings, run_id: str) -> None:
    """Delete a finished or queued run's folder (samples, checkpoints, logs); exported LoRAs stay.

    A started run must be stopped first. A run whose status.json is damaged can be deleted: its state is
    unknown, and deleting it is the way out besides mending the file by hand. The folder is renamed to a
    hidden name in one step and then removed, so no reader ever sees half a run.
    """
    folder = run_folder(settings, run_id)
    with queue_lock(settings):
        rec = folder.status_or_problem()
        state = None if isinstance(rec, Damaged) else rec.state
        if state in ACTIVE_STATES:
            raise JobError(f"run {run_id}: is {state}; stop it before deleting")
        trash = settings.runs_dir / f".deleted-{run_id}-{int(time.time() * 1000)}"
        os.rename(folder.path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    _refresh(settings, run_id)
