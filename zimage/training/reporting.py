"""How a trainer talks to the outside: the run folder's status, metrics and log, plus a heartbeat.

status.json is rewritten atomically under one lock by the training thread (state changes) and a
daemon heartbeat thread (every few seconds, even while models load or caches fill), so the app can
tell a slow phase from a dead worker. The same thread appends metrics.jsonl lines within half a
second of their step, which keeps file writes out of the training loop (they cost a few percent of
a small step); every state change flushes them first. Without a run folder (tests, benchmarks)
everything is kept in memory and log lines go to `echo`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from zimage.runfolder import ControlRequests, RunFolder

HEARTBEAT_SECONDS = 3.0  # DESIGN: at least every 10 s
METRICS_FLUSH_SECONDS = 0.5


class Reporter:
    def __init__(self, run: RunFolder | None = None, echo: Callable[[str], None] | None = None):
        self.run = run
        self.echo = echo
        self.lines: list[str] = []
        self.metrics: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._live: dict[str, Any] = {}  # fields the heartbeat writes (step, phase)
        self._pending: deque[dict[str, Any]] = deque()  # metrics lines not yet on disk
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- log, metrics, status ------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.lines.append(message)
        if self.run is not None:
            self.run.log(message)
        if self.echo is not None:
            self.echo(message)

    def add_metrics(self, record: dict[str, Any]) -> None:
        self.metrics.append(record)
        if self.run is not None:
            self._pending.append(record)
            if self._thread is None:  # no background writer: write now
                self.flush_metrics()

    def flush_metrics(self) -> None:
        if self.run is None:
            return
        with self._write_lock:
            lines = []
            while self._pending:
                lines.append(self._pending.popleft())
            try:
                self.run.append_metrics(*lines)
            except OSError:  # a full disk: keep them for the next try
                self._pending.extendleft(reversed(lines))
                raise

    def status(self, **fields: Any) -> dict[str, Any]:
        """Write `fields` into status.json now (state changes, final results)."""
        if "state" in fields:
            self.flush_metrics()  # a reader seeing the new state finds every metrics line before it
        with self._lock:
            self._live.update({k: v for k, v in fields.items() if k in ("step", "phase")})
            if self.run is None:
                return dict(fields)
            return self.run.update_status(**fields)

    def progress(self, **fields: Any) -> None:
        """Remember live fields (step, phase); the heartbeat writes them without slowing the loop."""
        self._live.update(fields)

    def poll_control(self) -> ControlRequests:
        return self.run.poll_control() if self.run is not None else ControlRequests()

    # -- heartbeat -----------------------------------------------------------------------------
    def beat(self) -> None:
        if self.run is None:
            return
        with self._lock:
            self.run.update_status(**self._live)

    def start_heartbeat(self, interval: float = HEARTBEAT_SECONDS) -> None:
        if self.run is None or self._thread is not None:
            return

        def loop() -> None:
            last_beat = time.monotonic()
            while not self._stop.wait(min(interval, METRICS_FLUSH_SECONDS)):
                try:
                    self.flush_metrics()
                    if time.monotonic() - last_beat >= interval:
                        self.beat()
                        last_beat = time.monotonic()
                except OSError:  # a full disk must not kill training; the next tick tries again
                    pass

        self._thread = threading.Thread(target=loop, name="zimage-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush_metrics()


@lru_cache(maxsize=1)
def _this_process():
    import psutil

    return psutil.Process()  # built once: construction reads /proc, about half a millisecond


def memory_figures(device_type: str) -> tuple[int, int]:
    """(allocated, peak) bytes: accelerator memory on CUDA, this process's resident memory on the CPU."""
    if device_type == "cuda":
        import torch

        return int(torch.cuda.memory_allocated()), int(torch.cuda.max_memory_allocated())
    # Reading /proc costs about 0.25 ms, over 1% of a tiny-model step; resident memory moves slowly, so
    # one reading a second is plenty for a chart.
    now = time.monotonic()
    if now - _cpu_reading[0] >= 1.0:
        import resource

        rss = _this_process().memory_info().rss
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        _cpu_reading[:] = [now, int(rss), int(max(rss, peak_kib * 1024))]
    return _cpu_reading[1], _cpu_reading[2]


_cpu_reading: list = [-1e9, 0, 0]  # [monotonic time, rss, peak] of the last CPU reading
