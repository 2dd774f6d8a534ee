"""How a trainer talks to the outside: its Job (zimage.job), known here as `Reporter`, and memory figures.

The trainer (and control.py, sampling.py) report through `Reporter`: log, add_metrics / flush_metrics,
status, progress, poll_control, beat, start_heartbeat / stop_heartbeat and `.run` (the RunFolder, or
None). `Reporter()` without a run folder keeps everything in memory (tests, benchmarks);
`Reporter(RunFolder(...))` writes the folder, with metrics lines appended by the heartbeat thread within
half a second of their step and flushed before every state change. `zimage train` gets its Reporter from
zimage.job.run_job, which also owns the start, the signals and the final state.
"""

from __future__ import annotations

import time
from functools import lru_cache

from zimage.job import HEARTBEAT_SECONDS, METRICS_FLUSH_SECONDS, Job

__all__ = ["HEARTBEAT_SECONDS", "METRICS_FLUSH_SECONDS", "Reporter", "memory_figures"]

Reporter = Job  # one class: what the trainer calls its reporter is the job run_job hands to every kind


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
