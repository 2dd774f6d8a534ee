"""Which process this is when the trainer runs under `torchrun` or `accelerate launch` (data parallel).

Both launchers set RANK / LOCAL_RANK / WORLD_SIZE for every process before Python starts, so the run
folder logic can tell rank 0 (the only writer of the run folder and the LoRA) from the others before
accelerate is even imported. Without a launcher this is a single process of rank 0. `make_accelerator` builds the run's Accelerator
(multi-CPU under torchrun on a machine without CUDA, DESIGN.md section 6).
"""

from __future__ import annotations

import os


def process_rank() -> int:
    """The global rank (0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


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
