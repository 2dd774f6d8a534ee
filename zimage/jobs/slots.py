"""GPU slots: which GPUs this host offers and how many jobs each may run at once.

Configured by the environment of the scheduler process (the app or `zimage worker`), else by the home's
settings.toml (`[scheduler] gpus = "0,1"`, `jobs_per_gpu = 2`):
    ZIMAGE_GPUS          "0,1,3" (GPU ids to use), or "none" for CPU only; default: CUDA_VISIBLE_DEVICES
                         if set, else the GPUs NVML (or `nvidia-smi -L`) lists, else CPU only
    ZIMAGE_JOBS_PER_GPU  jobs sharing one GPU (default 1)
A CPU-only host runs one job at a time. A worker gets CUDA_VISIBLE_DEVICES naming its GPUs (empty on a
CPU-only host, so a stray CUDA library finds none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass

from zimage.errors import UserError
from zimage.settings import SchedulerSettings


class SlotConfigError(UserError):
    """ZIMAGE_GPUS / ZIMAGE_JOBS_PER_GPU hold something unusable."""


@dataclass(frozen=True)
class SlotConfig:
    gpu_ids: tuple[str, ...] = ()  # empty: CPU-only host
    jobs_per_gpu: int = 1

    @property
    def capacity(self) -> int:
        return len(self.gpu_ids) * self.jobs_per_gpu if self.gpu_ids else 1

    def describe(self) -> str:
        if not self.gpu_ids:
            return "CPU only: one job at a time"
        return f"GPUs {','.join(self.gpu_ids)} x {self.jobs_per_gpu} job(s) each"


def _detected_ids() -> list[str]:
    """The GPU indices NVML lists (no CUDA context: the scheduler runs inside the app), else nvidia-smi's."""
    from zimage.system import gpu_report

    report = gpu_report()
    if report.gpus:
        return [str(g.index) for g in report.gpus]
    return _nvidia_smi_ids()


def _nvidia_smi_ids() -> list[str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, _ in enumerate(ln for ln in out.splitlines() if ln.strip().startswith("GPU "))]


def _parse_ids(text: str, what: str) -> tuple[str, ...]:
    ids = tuple(p.strip() for p in text.split(",") if p.strip())
    for gid in ids:
        if not (gid.isdigit() or gid.startswith(("GPU-", "MIG-"))):
            raise SlotConfigError(f"{what}: {gid!r} is not a GPU index or UUID")
    return ids


def slot_config(
    gpus: str | list[str] | None = None, jobs_per_gpu: int | None = None, home: SchedulerSettings | None = None
) -> SlotConfig:
    """Explicit arguments win over the environment, which wins over settings.toml (`home`), then detection."""
    if gpus is None:
        gpus = os.environ.get("ZIMAGE_GPUS", home.gpus if home is not None else None)
    if isinstance(gpus, str):
        ids = () if gpus.strip().lower() in ("none", "cpu", "") else _parse_ids(gpus, "ZIMAGE_GPUS")
    elif gpus is not None:
        ids = tuple(str(g) for g in gpus)
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = _parse_ids(visible, "CUDA_VISIBLE_DEVICES") if visible.strip() not in ("", "-1") else ()
        else:
            ids = tuple(_detected_ids())
    if jobs_per_gpu is None:
        raw = os.environ.get("ZIMAGE_JOBS_PER_GPU", str(home.jobs_per_gpu if home is not None else 1))
        try:
            jobs_per_gpu = int(raw)
        except ValueError:
            raise SlotConfigError(f"ZIMAGE_JOBS_PER_GPU: {raw!r} is not a whole number") from None
    if jobs_per_gpu < 1:
        raise SlotConfigError(f"jobs per GPU: {jobs_per_gpu} must be at least 1")
    return SlotConfig(gpu_ids=ids, jobs_per_gpu=jobs_per_gpu)


def assign(config: SlotConfig, busy: list[str | None], need: int = 1) -> list[str] | None:
    """GPU ids for a job needing `need` GPUs, given the gpu_ids strings of the jobs running now
    ("0", "0,1", "" for CPU); None when it has to wait. On a CPU-only host: [] when nothing runs."""
    if not config.gpu_ids:
        return [] if not busy else None
    if need > len(config.gpu_ids):
        need = len(config.gpu_ids)  # the caller refuses such jobs before asking; never block the line
    load = Counter({g: 0 for g in config.gpu_ids})
    for ids in busy:
        for g in (ids or "").split(","):
            if g in load:
                load[g] += 1
    free = [g for g in config.gpu_ids if load[g] < config.jobs_per_gpu]
    if len(free) < need:
        return None
    free.sort(key=lambda g: (load[g], config.gpu_ids.index(g)))  # least loaded first
    return sorted(free[:need], key=config.gpu_ids.index)
