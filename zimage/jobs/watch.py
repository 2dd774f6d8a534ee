"""File events for the scheduler: which run folders (or datasets) changed, so they are ingested at once.

watchdog (inotify on Linux) watches registry/runs and datasets recursively. Events only mark folders
dirty and wake the scheduler; the periodic rescan stays the safety net for whatever events miss (network
file systems, the inotify watch limit, a watcher that could not start).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from zimage.settings import Settings

log = logging.getLogger("zimage.jobs")

WATCHED_FILES = {"status.json", "config.json", "metrics.jsonl", "samples.jsonl", "checkpoints"}


class _Handler:
    """watchdog handler: maps a path to its run folder (or the datasets) and reports it."""

    def __init__(self, settings: Settings, mark_dirty: Callable[..., None]):
        self.settings = settings
        self.mark_dirty = mark_dirty

    def dispatch(self, event) -> None:
        if event.event_type not in ("created", "modified", "moved", "deleted"):
            return  # opened/closed events: our own reads would wake us forever
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = Path(os.fsdecode(raw))
            try:
                parts = path.relative_to(self.settings.runs_dir).parts
            except ValueError:
                if self.settings.datasets_dir in path.parents:
                    self.mark_dirty(datasets=True)
                continue
            if not parts or parts[0].startswith("."):
                continue  # a folder being created or deleted: its rename is the event that counts
            if len(parts) == 1 or parts[1] in WATCHED_FILES:  # log.txt and samples/ do not matter
                self.mark_dirty(parts[0])


class FolderWatch:
    """Starts watching at once; `stop()` ends it. Never raises: without events the rescan still works."""

    def __init__(self, settings: Settings, mark_dirty: Callable[..., None]):
        self._observer = None
        try:
            from watchdog.observers import Observer

            # watchdog warns when a folder is created and renamed at once (atomic checkpoints); harmless.
            warnings.filterwarnings("ignore", message="Callback with id", category=RuntimeWarning)
            observer = Observer()
            handler = _Handler(settings, mark_dirty)
            for folder in (settings.runs_dir, settings.datasets_dir):
                folder.mkdir(parents=True, exist_ok=True)
                observer.schedule(handler, str(folder), recursive=True)
            observer.daemon = True
            observer.start()
            self._observer = observer
        except Exception:  # e.g. the inotify watch limit
            log.warning("file events unavailable; relying on the periodic rescan", exc_info=True)

    @property
    def active(self) -> bool:
        return self._observer is not None

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
            self._observer = None
