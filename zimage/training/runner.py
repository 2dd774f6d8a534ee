"""Run one training job in a run folder: status from start to end, heartbeat, signals, failures.

This is what `zimage train` (and so the job queue's detached worker) calls. Exit codes: 0 completed
or stopped on request, 1 failed (status.json then holds the error and the traceback tail; an
out-of-memory error says which settings lower memory). With `resume`, training continues from the
newest complete checkpoint in the run folder. Under torchrun / accelerate launch every process runs
this, but only rank 0 writes the run folder (status, log, metrics, samples, checkpoints, the LoRA).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from zimage.config import ResolvedConfig
from zimage.runfolder import RunFolder
from zimage.settings import Settings
from zimage.training.reporting import Reporter

TRACEBACK_TAIL = 4000  # characters of traceback kept in status.json


@contextmanager
def stop_on_signals(on_signal: Callable[[str], None]):
    """SIGTERM / SIGINT ask for a graceful stop (save, then exit) instead of killing mid-step.

    A second signal gives up on the graceful stop: KeyboardInterrupt, and the run ends `failed`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    received: list[str] = []

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if received:
            raise KeyboardInterrupt(f"received {name} again while stopping")
        received.append(name)
        on_signal(f"received {name}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_training(
    resolved: ResolvedConfig,
    settings: Settings,
    run_dir: Path,
    echo: Callable[[str], None] | None = None,
    on_step: Callable[[dict], None] | None = None,
    resume: bool = False,
) -> int:
    """Train in `run_dir` (config.json already written). Returns the process exit code."""
    from zimage.training.checkpoints import newest_checkpoint
    from zimage.training.distributed import is_main_rank, process_rank
    from zimage.training.trainer import LoraTrainer

    main = is_main_rank()
    run = RunFolder(run_dir)
    checkpoint = newest_checkpoint(run.checkpoints_dir) if resume else None
    if resume:
        run.skip_pending_control()  # save/sample-now counts in control.json were handled before
    reporter = Reporter(run if main else None, echo=echo if main else None)
    if main:
        run.mark_worker_started("train", total_steps=resolved.config.num_steps)
        start = checkpoint.step if checkpoint else 0
        reporter.status(resumed_from_step=start if resume else None, step=start)
        if resume and checkpoint is None:
            reporter.log("Resume asked, but the run folder holds no complete checkpoint: starting at step 0")
    reporter.progress(step=checkpoint.step if checkpoint else 0, phase="starting")
    reporter.start_heartbeat()
    trainer = LoraTrainer(resolved, settings, reporter, run_dir=run.path, resume_from=checkpoint)
    try:
        with stop_on_signals(trainer.request_stop):
            trainer.setup()
            result = trainer.train(on_step=on_step)
        reporter.status(
            state=result.state,
            phase="done",
            step=result.steps,
            ended=time.time(),
            output_path=str(result.output_path) if result.output_path else None,
            final_loss=result.final_loss,
        )
        reporter.log(f"Run {result.state} at step {result.steps}")
        return 0
    except BaseException as exc:  # every failure, including KeyboardInterrupt, ends as `failed` on disk
        message = str(exc) or type(exc).__name__
        if _is_out_of_memory(exc):
            message = out_of_memory_message(resolved.config, message)
        tail = traceback.format_exc()[-TRACEBACK_TAIL:]
        reporter.log(f"Failed: {message}")
        if not main:  # this rank has no run folder to write: its own failure goes to its stderr
            print(f"[rank {process_rank()}] failed: {message}\n{tail}", file=sys.stderr, flush=True)
        step = trainer.step or (checkpoint.step if checkpoint else 0)
        reporter.status(state="failed", step=step, ended=time.time(), error=message, traceback=tail)
        return 1
    finally:
        reporter.stop_heartbeat()
        trainer.cleanup()


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def out_of_memory_message(config, detail: str = "") -> str:
    """The failure text for an out-of-memory error: what ran out, and the settings that lower memory."""
    from zimage.training.memory import memory_savings

    try:
        savings = [(advice, gib) for advice, gib in memory_savings(config) if gib >= 0.05]
    except Exception:  # the advice must never hide the real error
        savings = []
    first = (detail.splitlines() or [""])[0][:300]
    lines = [f"Out of memory ({first})" if first else "Out of memory."]
    if savings:
        lines.append("Settings that lower memory (estimated saving):")
        lines += [f"  - {advice} (about {gib:.1f} GiB)" for advice, gib in savings[:6]]
    else:
        lines.append("Lower resolution, batch_size or lora_rank, or turn on gradient_checkpointing.")
    return "\n".join(lines)
