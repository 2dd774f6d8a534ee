"""Does a validated config fit this host? The memory estimate against the GPU's or the host's memory.

`with_memory_warning(resolved)` returns the ResolvedConfig with a warning added when the estimate
(zimage.training.memory) is above what this host has; `zimage train` calls it after validation.
"""

from __future__ import annotations

import dataclasses
import sys

from zimage.config import ResolvedConfig


def host_memory(cuda: bool) -> tuple[float, str]:
    """(GiB, what) the run has: the GPU's total where this process already holds a CUDA context, else RAM.

    Only a process that already set up CUDA asks torch (the app never creates a CUDA context, DESIGN.md
    section 8); everywhere else the host's RAM is the figure.
    """
    torch = sys.modules.get("torch")
    if cuda and torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        _free, total = torch.cuda.mem_get_info()
        return total / 2**30, "GPU memory"
    import psutil

    return psutil.virtual_memory().total / 2**30, "RAM"


def memory_warning(c, cuda: bool) -> str | None:
    """A warning when the memory estimate of `c` is above what this host has, with what lowers it."""
    from zimage.training.memory import estimate_memory, memory_savings

    try:
        estimate = estimate_memory(c)
    except (ValueError, OSError, KeyError):  # an unreadable model folder: validation reports it elsewhere
        return None
    need = estimate.device_gib if cuda else estimate.total_gib
    have, what = host_memory(cuda)
    if need <= have:
        return None
    advice = "; ".join(f"{text} (about {gib:.1f} GiB less)" for text, gib in memory_savings(c)[:3])
    return (
        f"memory: this config needs about {need:.1f} GiB ({estimate.peak_phase}), but this host has "
        f"{have:.1f} GiB of {what}; it will likely run out of memory" + (f". Try: {advice}" if advice else "")
    )


def with_memory_warning(resolved: ResolvedConfig) -> ResolvedConfig:
    """`resolved` with the memory warning (if any) appended to its warnings."""
    warning = memory_warning(resolved.config, resolved.machine.cuda)
    if warning is None:
        return resolved
    return dataclasses.replace(resolved, warnings=(*resolved.warnings, warning))
