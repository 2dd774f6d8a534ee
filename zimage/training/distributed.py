"""Which process this is when the trainer runs under `torchrun` or `accelerate launch` (data parallel).

Both launchers set RANK / LOCAL_RANK / WORLD_SIZE for every process before Python starts, so the run
folder logic can tell rank 0 (the only writer of the run folder and the LoRA) from the others before
accelerate is even imported. Without a launcher this is a single process of rank 0. `make_accelerator` builds the run's Accelerator
(multi-CPU under torchrun on a machine without CUDA, DESIGN.md section 6). Under torchrun each rank also
leaves its error in the agent's error file (`record_rank_error`) and ends when the agent is gone
(`watch_launcher`); zimage.jobs.ranks is the agent of a queued multi-GPU job.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

LAUNCHER_POLL_SECONDS = 1.0


def process_rank() -> int:
    """The global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def under_torchrun() -> bool:
    """True in a rank started by torch's elastic agent (torchrun, zimage.jobs.ranks) with others."""
    return world_size() > 1 and "TORCHELASTIC_RUN_ID" in os.environ


def record_rank_error(exc: BaseException) -> None:
    """Under torchrun: write this rank's error and traceback to the agent's error file, so the agent (and
    zimage.jobs.ranks, which fails the job with it) knows why this rank ended. No op otherwise."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        ErrorHandler().record_exception(exc)
    except Exception:  # the error file is a courtesy: the job's own failure path must go on
        pass


def watch_launcher(run_dir: Path | None) -> threading.Thread | None:
    """Under torchrun: end this rank when its agent is gone (killed with SIGKILL, it cannot stop the ranks),
    so no rank is left running. Rank 0 (`run_dir` given) first records why in status.json."""
    if not under_torchrun():
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(LAUNCHER_POLL_SECONDS)
        if run_dir is not None:
            from zimage.runfolder import RunFolder

            try:
                error = f"the torchrun agent (PID {parent}) ended; rank {process_rank()} stopped with it"
                RunFolder(run_dir).update_status(state="failed", error=error, ended=time.time())
            except Exception:
                pass
        os._exit(1)

    thread = threading.Thread(target=watch, name="zimage-launcher-watch", daemon=True)
    thread.start()
    return thread


def is_main_rank() -> bool:
    """True for the process that writes the run folder (global rank 0)."""
    return process_rank() == 0


def make_accelerator(mixed_precision: str, accumulation: int):
    """An Accelerator for this run. accelerate keeps one state per process; a finished run in the same
    process (tests, a notebook) may have left another precision there, which is dropped first."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def make():
        return Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation
        )

    try:
        return make()
    except ValueError as exc:
        if "already been initialized" not in str(exc):
            raise
        AcceleratorState._reset_state()  # keeps the process-level (distributed) state
        return make()
