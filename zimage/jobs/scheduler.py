"""This host's scheduler: keeps the registry up to date, notices dead workers, starts queued jobs.

One per host (the owner lock, see owner.py). It runs as a background thread of the app
(`ensure_scheduler`, guarded against a second start in the process and, through the lock, on the host)
or in the foreground as `zimage worker`. Each tick (default 1 s, sooner on a file event):
1. answers inbox requests (rebuild, hand-over);
2. ingests the run folders that changed: watchdog events mark them, and a full rescan every few seconds
   catches whatever the events missed (network disks, inotify limits);
3. reaps its own finished children, and marks `lost` every active run on this host whose worker process
   is gone (PID + start time) without writing a final state, keeping its last step and heartbeat; a run on
   a cluster backend is asked about through that backend instead (remote.py);
4. starts queued jobs in line order (priority, then FIFO), one line per backend (local, ray, slurm), while
   that backend has free slots (strict order: a job needing two GPUs is not overtaken), passing over the
   jobs of a user at the home's `user_limit`, and records in each queued job's status.json why it waits
   (only when the reason changes).
Steps 3 and 4 are dispatch.py; a registry file deleted under the scheduler is rebuilt from the folders.
Workers are detached, so stopping the scheduler leaves them running; the next scheduler re-attaches to
them simply by finding them alive.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 - imported before our exit hook is registered (see below)
import logging
import os
import socket
import threading
import time
from pathlib import Path

from zimage.errors import UserError
from zimage.jobs import dispatch, remote
from zimage.jobs import owner as owner_mod
from zimage.jobs.launcher import process_alive
from zimage.jobs.owner import OwnerLock, describe_owner
from zimage.jobs.slots import SlotConfig, slot_config
from zimage.jobs.watch import FolderWatch
from zimage.registry.db import Registry
from zimage.registry.ingest import Ingester
from zimage.registry.schema import RegistryError
from zimage.runfolder import read_json
from zimage.settings import Settings

log = logging.getLogger("zimage.jobs")


_schedulers: dict[Path, Scheduler] = {}
_schedulers_lock = threading.Lock()
_exit_hook_registered = False


def _register_exit_hook() -> None:
    """Stop every scheduler of this process before the interpreter tears down.

    The scheduler is a daemon thread: at exit it would go on ticking while Python shuts down, meet
    "cannot schedule new futures after interpreter shutdown" in a scan (concurrent.futures refuses new work
    once its own exit hook ran), and DuckDB could be closed under a running query (an abort, exit code 134).
    threading's exit hooks run before those of concurrent.futures (in reverse order of registration, and
    concurrent.futures registered its hook when imported above) and before `atexit`, which only runs after
    the non-daemon threads (Streamlit's server too) have ended. So the thread stops and closes the database
    itself, in order, while everything still works. `atexit` is the fallback on Pythons without the hook.
    """
    global _exit_hook_registered
    if _exit_hook_registered:
        return
    _exit_hook_registered = True
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(stop_all)
    else:  # pragma: no cover - CPython has had it since 3.9
        atexit.register(stop_all)


class Scheduler:
    """See the module docstring. `start()` runs it in a thread; `run()` in the calling thread."""

    def __init__(
        self,
        settings: Settings,
        slots: SlotConfig | None = None,
        role: str = "app",
        launch_jobs: bool = True,
        tick: float = 1.0,
        rescan: float = 5.0,
        watch: bool = True,
    ):
        self.settings = settings
        self.slots = slots or slot_config(home=settings.home_settings().scheduler)
        self.role = role
        self.launch_jobs = launch_jobs
        self.tick_s, self.rescan_s, self.watch = tick, rescan, watch
        self.lock = OwnerLock(settings)
        self.registry: Registry | None = None
        self.ingester: Ingester | None = None
        self.ready = threading.Event()  # the database is open: queries work
        self.scanned = threading.Event()  # ... and every folder has been read once
        self.stopped = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._dirty: set[str] = set()
        self._datasets_dirty = False
        self._dirty_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._watch: FolderWatch | None = None
        self._handed_over_to: int | None = None
        self.host = socket.gethostname()
        self.error: str | None = None
        self._settings_problem: str | None = None
        self.created = time.monotonic()

    # -- control ------------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run_safely, name="zimage-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def mark_dirty(self, run_id: str | None = None, datasets: bool = False) -> None:
        with self._dirty_lock:
            if run_id:
                self._dirty.add(run_id)
            self._datasets_dirty |= datasets
        self._wake.set()

    def status(self) -> dict:
        """For a sidebar: who owns the registry and what the slots are."""
        return {
            "owner": self.lock.held,
            "ready": self.ready.is_set(),
            "held_by": describe_owner(self.lock.owner()),
            "slots": self.slots.describe(),
            "error": self.error,
            "file_events": self._watch is not None and self._watch.active,
        }

    # -- main loop ----------------------------------------------------------------------------------
    def _run_safely(self) -> None:
        try:
            self.run()
        except Exception as exc:  # a thread that dies silently would look like a hang
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("scheduler stopped by an error")

    def run(self) -> str:
        """Own the registry and schedule until stop() (or a hand-over); returns why it ended."""
        try:
            while not self._stop.is_set():
                if not self._acquire():
                    return "stopped"
                reason = self._serve()
                if reason != "handed over" or self.role != "worker":
                    return reason
                self._standby_after_handover()
            return "stopped"
        finally:
            self.stopped.set()

    def _acquire(self) -> bool:
        asked: int | None = None
        while not self._stop.is_set():
            if self.lock.try_acquire(self.role):
                return True
            info = self.lock.owner() or {}
            if self.role == "app" and info.get("role") == "worker" and info.get("pid") != asked:
                asked = info.get("pid")
                owner_mod.post_request(self.settings, "handover", role=self.role)
                log.info("asked %s to hand the registry over", describe_owner(info))
            self._stop.wait(0.5)
        return False

    def _standby_after_handover(self) -> None:
        # Let the app that asked take the lock before competing for it again.
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            # scheduler.json names the last owner even after it let go, so a short-lived app counts too.
            info = read_json(self.lock.info_path, {}) or {}
            if info.get("pid") == self._handed_over_to or not process_alive(self._handed_over_to, None):
                break
            self._stop.wait(0.5)

    def _serve(self) -> str:
        try:
            self.registry = Registry(self.settings.db_path)
            self.ingester = Ingester(self.registry, self.settings)
            self._watch = FolderWatch(self.settings, self.mark_dirty) if self.watch else None
            # Ready before the first scan: pages can read while a fresh database fills up (each batch
            # commits on its own), and a restart with an existing database catches up in moments.
            self.ready.set()
            log.info(
                "scheduler (%s, pid %d) owns %s; %s",
                self.role,
                os.getpid(),
                self.settings.db_path,
                self.slots.describe(),
            )
            last_scan = float("-inf")
            self._wake.set()  # the first pass (a full scan) at once
            while not self._stop.is_set():
                self._wake.wait(self.tick_s)
                self._wake.clear()
                if self._stop.is_set():
                    break
                if not self.settings.runs_dir.is_dir():  # the home went away (a test's temp folder)
                    log.warning("%s is gone; scheduler stops", self.settings.runs_dir)
                    break
                full = time.monotonic() - last_scan >= self.rescan_s
                try:
                    if self.step(full=full) == "handover":
                        return "handed over"
                except RegistryError:
                    raise
                except Exception:
                    log.exception("scheduler tick failed; continuing")
                if full:
                    last_scan = time.monotonic()
                    self.scanned.set()
                self._stop.wait(0.05)  # bursts of file events: ingest at most ~20 times a second
            return "stopped"
        finally:
            self.ready.clear()
            self.scanned.clear()
            if self._watch is not None:
                self._watch.stop()
                self._watch = None
            if self.registry is not None:
                self.registry.close()
            self.lock.release()

    def step(self, full: bool = True) -> str | None:
        """One tick (public so tests and `zimage worker --once` can drive it)."""
        if self._answer_inbox() == "handover":
            return "handover"
        if not self.settings.db_path.exists():
            # Deleted under us (by hand, a cleanup script): DuckDB would go on writing to the unlinked file
            # and the next process would find nothing. The folders are the truth, so rebuild from them now.
            log.warning("%s was deleted while in use; rebuilding it from the run folders", self.settings.db_path)
            counts = self.rebuild()
            log.warning("registry recreated: %d runs, %d datasets", counts["runs"], counts["datasets"])
            return None
        if full:
            with self._dirty_lock:
                self._dirty.clear()
                self._datasets_dirty = False
            self.ingester.scan()
        else:
            with self._dirty_lock:
                dirty, self._dirty = self._dirty, set()
                datasets, self._datasets_dirty = self._datasets_dirty, False
            for run_id in sorted(dirty):
                self.ingester.ingest_run(run_id)
            if datasets:
                self.ingester.scan_datasets()
        self._reap()
        self._reconcile()
        if self.launch_jobs:
            self._start_queued()
        return None

    # -- inbox --------------------------------------------------------------------------------------
    def _answer_inbox(self) -> str | None:
        for req in owner_mod.take_requests(self.settings):
            action = req.get("action")
            if action == "rebuild":
                try:
                    counts = self.rebuild()
                    owner_mod.reply(self.settings, req["id"], {"ok": True, "counts": counts})
                except Exception as exc:
                    log.exception("rebuild failed")
                    owner_mod.reply(self.settings, req["id"], {"ok": False, "error": str(exc)})
            elif action == "handover" and self.role == "worker":
                self._handed_over_to = req.get("pid")
                log.info("handing the registry over to the app (pid %s)", req.get("pid"))
                return "handover"
            elif action == "ping":
                owner_mod.reply(self.settings, req["id"], {"ok": True, "pid": os.getpid(), "role": self.role})
        return None

    def rebuild(self) -> dict:
        """Recreate the database from the folders, then swap it in under the readers."""
        from zimage.registry.ingest import rebuild_into

        tmp = self.settings.registry_dir / f".rebuild-{os.getpid()}.duckdb"
        with self.registry.write_lock:
            counts = rebuild_into(tmp, self.settings)
            self.registry.replace_file(tmp)
            self.ingester.load()
        return counts

    # -- workers (the work itself is in dispatch.py) ------------------------------------------------
    def _reap(self) -> None:
        for run_id in dispatch.reap():
            self.ingester.ingest_run(run_id)
            row = self.ingester.runs.get(run_id) or {}
            log.info("ended %s (%s): %s", run_id, row.get("kind") or "job", row.get("state") or "unknown")

    def _reconcile(self) -> None:
        dispatch.mark_lost(self.settings, self.ingester, self.host)
        remote.reconcile(self.settings, self.ingester)  # runs on Ray or Slurm: their backend says

    def _start_queued(self) -> None:
        try:
            limit = self.settings.home_settings().scheduler.user_limit  # re-read only when the file changed
        except UserError as exc:  # settings.toml broken meanwhile: start nothing rather than ignore a limit
            if str(exc) != self._settings_problem:
                log.error("not starting queued jobs: %s", exc)
            self._settings_problem = str(exc)
            return
        self._settings_problem = None
        dispatch.start_queued(self.settings, self.ingester, self.slots, self.host, limit)
        dispatch.note_waiting(self.settings, self.ingester, self.slots, self.host, limit)


def _log_job_events() -> None:
    """One line per job event (started, ended, lost) on stderr, i.e. in the app server's log, where nothing
    else configured logging for zimage (`zimage worker` does its own; a test's or embedder's config wins)."""
    ours = logging.getLogger("zimage")
    if ours.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s zimage %(levelname)s %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)


def ensure_scheduler(settings: Settings, **options) -> Scheduler:
    """This process's scheduler for `settings` (started on the first call; options apply then).

    ZIMAGE_SCHEDULER_LAUNCH=0 in the environment keeps it from starting queued jobs (ingest only).
    """
    key = settings.db_path.resolve()
    with _schedulers_lock:
        sched = _schedulers.get(key)
        if sched is not None and not sched.stopped.is_set():
            return sched
        if "launch_jobs" not in options and os.environ.get("ZIMAGE_SCHEDULER_LAUNCH", "1") == "0":
            options["launch_jobs"] = False
        settings.ensure()
        _log_job_events()
        _register_exit_hook()
        sched = Scheduler(settings, **options).start()
        _schedulers[key] = sched
        return sched


def registry_for(settings: Settings, timeout: float = 15.0) -> Registry:
    """The registry of this process's scheduler, waiting for it to be ready: up to `timeout` s after its
    start (the first scan of a big home takes a while), not again on every page run once it is known
    to be waiting for another process."""
    sched = ensure_scheduler(settings)
    remaining = max(0.2, timeout - (time.monotonic() - sched.created))
    if sched.ready.wait(remaining) and sched.registry is not None:
        sched.scanned.wait(min(remaining, 3.0))  # a complete picture, if it comes soon
        return sched.registry
    if sched.error:
        raise RegistryError(f"the scheduler stopped: {sched.error}")
    raise RegistryError(
        f"the registry is held by {describe_owner(sched.lock.owner())}; this app takes it over when that "
        "process stops (or hands it over). Try again in a moment."
    )


def current(settings: Settings) -> Scheduler | None:
    """The running scheduler of this process for `settings`, if any."""
    sched = _schedulers.get(settings.db_path.resolve())
    return sched if sched is not None and sched.ready.is_set() else None


def refresh_run(settings: Settings, run_id: str) -> None:
    """Re-read one run into the registry now, if this process owns it (after a button press)."""
    sched = current(settings)
    if sched is not None and sched.ingester is not None:
        try:
            sched.ingester.ingest_run(run_id)
        except Exception:
            log.exception("refresh of %s failed; the next tick retries", run_id)
        sched.mark_dirty()


def stop_all(timeout: float = 10.0) -> None:
    """Stop every scheduler of this process: at interpreter exit (the hook above) and after tests."""
    with _schedulers_lock:
        scheds = list(_schedulers.values())
        _schedulers.clear()
    for sched in scheds:
        sched.stop(timeout)
