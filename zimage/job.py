"""One job lifecycle for every worker kind (trainer, captioner, test grid): `run_job(run_dir, kind, fn)`.

A worker's whole conversation with its run folder (DESIGN.md section 2) lives here; kinds differ only in
the function that does their work:

    def caption(job: Job) -> dict | str | None:     # the final state, with fields; None means completed
        job.status(state="running", step=0)
        for batch in batches:
            if job.poll_control().stop:              # stop / pause / save_now / sample_now, each id once
                return {"state": "stopped", "step": done}
            ...
            job.progress(step=done)                  # the heartbeat thread writes it within seconds
            job.add_metrics({"step": done, ...})     # buffered; the heartbeat thread appends it
        return {"state": "completed", "step": done}

    exit_code = run_job(run_dir, "caption", caption, total_steps=None, writer=True, echo=None)

run_job marks the worker started (state starting, pid, process start time, host, kind, total_steps,
CUDA_VISIBLE_DEVICES), runs a heartbeat thread (status.json every HEARTBEAT_SECONDS, pending metrics
lines every METRICS_FLUSH_SECONDS, both flushed before every state change), turns the first SIGTERM /
SIGINT into a graceful stop request (a second one gives up: KeyboardInterrupt), writes the final state
(completed or stopped; or failed with the error and the traceback tail, for any BaseException,
KeyboardInterrupt and failures while reporting included) and returns the exit code: 0 completed or
stopped, 1 failed.

`Job()` without a run folder keeps everything in memory (tests, benchmarks, the ranks other than 0 of a
data-parallel run); the trainer knows the class as `Reporter` (zimage.training.reporting).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zimage.errors import UserError
from zimage.runfolder import ControlRequests, RunFolder

__all__ = ["HEARTBEAT_SECONDS", "Job", "run_job"]

HEARTBEAT_SECONDS = 3.0  # DESIGN: at least every 10 s
METRICS_FLUSH_SECONDS = 0.5
TRACEBACK_TAIL = 4000  # characters of traceback kept in status.json
LIVE_FIELDS = ("step", "phase")  # status fields the heartbeat keeps writing once they are known

Outcome = dict[str, Any] | str | None


class Job:
    """One worker's job in its run folder (or in memory, without one): status, log, metrics, heartbeat,
    control requests and stop signals. Thread-safe where the heartbeat thread meets the worker."""

    def __init__(
        self,
        run: RunFolder | Path | str | None = None,
        echo: Callable[[str], None] | None = None,
        kind: str | None = None,
        total_steps: int | None = None,
    ):
        self.run = RunFolder(run) if isinstance(run, str | os.PathLike) else run
        self.echo = echo
        self.kind = kind
        self.total_steps = total_steps
        self.lines: list[str] = []  # every log line, also with a run folder (they are few)
        self.metrics: list[dict[str, Any]] = []  # in memory only without a run folder: a long run has many
        self.stop_reason: str | None = None  # why a stop was asked by a signal (None: not asked)
        self._on_stop: Callable[[str], None] | None = None
        self._at_end: list[Callable[[], None]] = []
        self.metric_listeners: list[Callable[[dict[str, Any]], None]] = []  # called with each metrics line
        self._finishing = False  # the final state is being written: signals no longer interrupt
        self._state: str | None = None  # the last state written
        self._lock = threading.Lock()
        self._live: dict[str, Any] = {}  # fields the heartbeat writes (step, phase, what progress() set)
        self._pending: deque[dict[str, Any]] = deque()  # metrics lines not yet on disk
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Record in status.json that this process now runs the job (state `starting`)."""
        if self.run is None:
            return
        self.run.mark_worker_started(self.kind or "job", total_steps=self.total_steps)
        if self.echo is not None and _output_goes_to(self.run.log_path):
            self.echo = None  # a launched worker's stdout/stderr already are log.txt: echoing logs twice

    def request_stop(self, reason: str) -> None:
        """Ask for a graceful stop (SIGTERM / SIGINT end here); poll_control() reports it from now on."""
        first = self.stop_reason is None
        if first:
            self.stop_reason = reason
        if self._on_stop is not None:
            self._on_stop(reason)
        elif first:
            self.log(f"Stopping: {reason}")

    def when_stopped(self, callback: Callable[[str], None]) -> None:
        """Hand stop requests from signals to `callback(reason)` (at once, if one came already)."""
        self._on_stop = callback
        if self.stop_reason is not None:
            callback(self.stop_reason)

    def at_end(self, callback: Callable[[], None]) -> None:
        """Run `callback` after the final state is on disk (freeing models); its errors are only logged."""
        self._at_end.append(callback)

    # -- log, metrics, status ------------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.lines.append(message)
        if self.run is not None:
            self.run.log(message)
        if self.echo is not None:
            self.echo(message)

    def add_metrics(self, record: dict[str, Any]) -> None:
        for listener in self.metric_listeners:  # experiment trackers (training/trackers.py) see every line
            listener(record)
        if self.run is None:
            self.metrics.append(record)
            return
        self._pending.append(record)
        if self._thread is None:  # no background writer: write now
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Write every pending metrics line now (one append). The checkpoint code calls it before a
        checkpoint is written, so the metrics of the steps a checkpoint holds are on disk before it is:
        a kill after the checkpoint and a resume from it lose no step. status() calls it too."""
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
        """Write `fields` into status.json now (state and phase changes, final results).

        The pending metrics lines go first: a reader seeing the new status finds every metrics line logged
        before it, and a phase change such as "saving checkpoint" puts the lines of the steps that
        checkpoint holds on disk before it is written."""
        self.flush_metrics()
        if "state" in fields:
            self._state = fields["state"]
        with self._lock:
            self._live.update({k: v for k, v in fields.items() if k in LIVE_FIELDS or k in self._live})
            if self.run is None:
                return dict(fields)
            return self.run.update_status(**fields)

    def progress(self, **fields: Any) -> None:
        """Remember live fields (step, phase, counters); the heartbeat writes them without slowing the loop."""
        self._live.update(fields)

    def poll_control(self) -> ControlRequests:
        """This moment's requests: control.json (each request id acted on once) plus a signal's stop."""
        req = self.run.poll_control() if self.run is not None else ControlRequests()
        req.stop = req.stop or self.stop_reason is not None
        return req

    # -- heartbeat -----------------------------------------------------------------------------------
    def beat(self) -> None:
        if self.run is None:
            return
        with self._lock:
            self.run.update_status(**self._live)

    def start_heartbeat(self, interval: float = HEARTBEAT_SECONDS) -> None:
        if self.run is None or self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            last_beat = time.monotonic()
            while not self._stop.wait(min(interval, METRICS_FLUSH_SECONDS)):
                try:
                    self.flush_metrics()
                    if time.monotonic() - last_beat >= interval:
                        self.beat()
                        last_beat = time.monotonic()
                except OSError:  # a full disk must not kill the job; the next tick tries again
                    pass

        self._thread = threading.Thread(target=loop, name="zimage-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush_metrics()

    # -- the end -------------------------------------------------------------------------------------
    def _complete(self, outcome: Outcome) -> int:
        fields = {"state": outcome} if isinstance(outcome, str) else dict(outcome or {})
        fields.setdefault("state", "completed")
        if fields["state"] not in ("completed", "stopped"):
            raise ValueError(f"a job ends completed or stopped, not {fields['state']!r}")
        self._finishing = True
        self.stop_heartbeat()
        step = fields.get("step", self._live.get("step"))
        self.log(f"Run {fields['state']}" + (f" at step {step}" if step is not None else ""))
        self.status(**{"ended": time.time(), **fields})
        return 0

    def _fail(self, exc: BaseException, describe_error: Callable[[BaseException], str | None] | None) -> int:
        """Write `failed` with the reason, whatever else fails meanwhile; never raises."""
        self._finishing = True
        try:
            self.stop_heartbeat()  # the pending metrics lines go out first, if they can
        except BaseException:
            pass
        message = None
        if describe_error is not None:
            try:
                message = describe_error(exc)
            except Exception:  # the advice must never hide the real error
                message = None
        if not message:  # a UserError's message is meant for a person; anything else says what it was
            text, name = str(exc), type(exc).__name__
            message = text if isinstance(exc, UserError) else (f"{name}: {text}" if text else name)
        # A UserError before the work is under way is a refusal (bad config, missing dataset): its message
        # names the field and why. Any failure later, with advice or not, keeps where it happened.
        refused = isinstance(exc, UserError) and self._state in (None, "starting")
        tail = None if refused else "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        tail = tail[-TRACEBACK_TAIL:] if tail else None
        # The newest live fields (step, counters) too: the last periodic write may be seconds old.
        fields = {**self._live, "state": "failed", "ended": time.time(), "error": message, "traceback": tail}
        if self.run is None:  # no run folder to write (a rank other than 0): its failure goes to stderr
            print(f"[rank {os.environ.get('RANK', '?')}] failed: {message}\n{tail or ''}", file=sys.stderr, flush=True)
            return 1
        try:
            self.log(f"Failed: {message}" + (f"\n{tail}" if tail else ""))
        except BaseException:
            pass
        try:
            self.run.update_status(**fields)
        except BaseException:
            # The live fields may be what failed (update_status makes values JSON-safe, but a key or a merge
            # can still go wrong): the state and the reason alone are what must land.
            essential = {k: fields[k] for k in ("state", "ended", "error", "traceback")}
            try:
                self.run.update_status(**essential)
            except BaseException as second:  # nothing more can be done on disk; say so where someone looks
                print(f"failed: {message}; could not record it in {self.run.status_path}: {second}", file=sys.stderr)
        return 1

    def _run_at_end(self) -> None:
        for callback in self._at_end:
            try:
                callback()
            except Exception as exc:
                try:
                    self.log(f"Cleanup failed: {type(exc).__name__}: {exc}")
                except Exception:
                    pass


def run_job(
    run_dir: Path | str | None,
    kind: str,
    fn: Callable[[Job], Outcome],
    total_steps: int | None = None,
    writer: bool = True,
    echo: Callable[[str], None] | None = None,
    describe_error: Callable[[BaseException], str | None] | None = None,
) -> int:
    """Run `fn(job)` as the job of `kind` in `run_dir`, from `starting` to its final state; returns the
    exit code (0 completed or stopped, 1 failed).

    `fn` returns the final state ("completed" | "stopped", or a dict with `state` and more fields such as
    output_path); None means completed. Only a `writer` touches the run folder (rank 0 of a data-parallel
    run); the others run with an in-memory Job. `describe_error(exc)` may give a better failure message.
    """
    job = Job(run_dir if writer else None, echo=echo if writer else None, kind=kind, total_steps=total_steps)
    if job.run is not None and _cancelled_before_start(job.run):
        return 0
    with _graceful_signals(job):
        try:
            job.start()
            job.start_heartbeat()
            code = job._complete(fn(job))
        except BaseException as exc:  # every failure, KeyboardInterrupt included, ends `failed` on disk
            code = job._fail(exc, describe_error)
        finally:
            job._run_at_end()
    return code


def _cancelled_before_start(run) -> bool:
    """A worker never revives a run taken out of the line (a cluster job that a late submission made after
    the person cancelled it): it says so in log.txt and leaves status.json as it is."""
    status = run.read_status() or {}
    if status.get("state") == "stopped" and status.get("cancelled"):
        run.log("worker: the run was cancelled before this worker started; not starting it")
        return True
    return False


@contextmanager
def _graceful_signals(job: Job) -> Iterator[None]:
    """SIGTERM / SIGINT ask for a graceful stop (the kind saves, then exits) instead of dying mid-step.

    A second signal gives up on the graceful stop: KeyboardInterrupt, and the run ends `failed`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[str] = []

    def handler(signum, _frame) -> None:
        name = signal.Signals(signum).name
        if job._finishing:
            return  # the final state is being written: let it finish
        if received:
            raise KeyboardInterrupt(f"received {name} again while stopping")
        received.append(name)
        job.request_stop(f"received {name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _output_goes_to(path: Path) -> bool:
    """True when this process's stdout or stderr is the file at `path` (the launcher's log.txt)."""
    try:
        target = os.stat(path)
    except OSError:
        return False
    for fd in (1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False
