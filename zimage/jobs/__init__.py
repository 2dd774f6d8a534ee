"""Jobs: the queue (in run folders), detached workers, GPU slots and the scheduler that starts them.

Pages and the CLI call these functions; none of them needs the registry database:

    enqueue(settings, kind, config, user=None, name=None, actor=None) -> run_id   put a job in line
    control(settings, run_id, action, actor=None)   stop | pause | resume | save_now | sample_now (stop on a
                                           queued job cancels it; resume on a stopped/lost run requeues it)
    cancel / move_up / move_down / delete_run(settings, run_id, actor=None)

`actor` (zimage.auth.Actor) is who acts: a member changes only their own runs, an admin anyone's, a viewer
none (zimage.auth.require); each attempt is an event in events.jsonl, refused ones too.
    ensure_scheduler(settings)             start this host's scheduler thread once (app)
    registry_for(settings)                 the app's registry for the query functions of zimage.registry
    rebuild(settings)                      `zimage registry rebuild`, whoever owns the registry now

Workers, slots and the scheduler: launcher.py, slots.py (ZIMAGE_GPUS, ZIMAGE_JOBS_PER_GPU), scheduler.py
(ZIMAGE_SCHEDULER_LAUNCH=0: ingest only), owner.py (one scheduler per host, inbox). Where a released job
runs: backends/ (local, ray, slurm; settings.toml `launcher`, a job's own `backend`), and remote.py watches
the runs on a cluster through their backend. A worker's own
lifecycle (status, heartbeat, control requests, final state) is zimage.job.
"""

from zimage.jobs.actions import cancel, control, delete_run, move_down, move_up
from zimage.jobs.queue import KINDS, JobError, enqueue, requeue
from zimage.jobs.rebuilding import rebuild
from zimage.jobs.users import os_user, resolve_user

__all__ = [
    "KINDS",
    "JobError",
    "cancel",
    "control",
    "delete_run",
    "enqueue",
    "ensure_scheduler",
    "move_down",
    "move_up",
    "os_user",
    "rebuild",
    "registry_for",
    "requeue",
    "resolve_user",
]


def ensure_scheduler(settings, **options):
    """Start this host's scheduler (ingest, reconcile, launch) in a background thread, once.

    Safe to call on every page run: a second call in the process returns the running one, and a
    scheduler in another process (another app or `zimage worker`) is detected through a lock file.
    """
    from zimage.jobs.scheduler import ensure_scheduler as _ensure

    return _ensure(settings, **options)


def registry_for(settings, timeout: float = 15.0):
    """This process's registry (a zimage.registry.Registry), starting the host's scheduler here if needed."""
    from zimage.jobs.scheduler import registry_for as _registry_for

    return _registry_for(settings, timeout)
