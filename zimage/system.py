"""What the host has: GPUs (from NVML) and disk used by the data folders. For the Home page and `zimage`.

The GPU facts come from NVML (`nvidia-ml-py`, imported as pynvml), the library nvidia-smi is built on: it
reads the driver's counters without creating a CUDA context. Asking torch instead (`mem_get_info`,
`get_device_name`) creates a context of about 500 MiB on every GPU, held by the Streamlit server for its
whole life. This module never imports torch. Without NVML or an NVIDIA driver the report says why
(`GpuReport.problem`) and lists no GPU.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from zimage.settings import Settings

BF16_CAPABILITY = (8, 0)  # Ampere and newer run bf16 autocast


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML's index: PCI bus order, which the launcher makes CUDA's order too (CUDA_DEVICE_ORDER)
    name: str
    total_bytes: int
    used_bytes: int  # by every process on the device, not just this one
    uuid: str = ""
    utilization: int | None = None  # percent of the last sample period a kernel ran; None: not reported
    capability: tuple[int, int] | None = None  # CUDA compute capability
    pids: tuple[int, ...] = ()  # the compute processes on it (those this user may see)

    def matches(self, gpu_id: str) -> bool:
        """True if `gpu_id` (an index or UUID, as in CUDA_VISIBLE_DEVICES and the slots) names this GPU."""
        gpu_id = gpu_id.strip()
        return gpu_id == str(self.index) or (bool(self.uuid) and self.uuid.startswith(gpu_id) and len(gpu_id) > 4)


@dataclass(frozen=True)
class GpuReport:
    """The GPUs NVML sees, or (no GPUs) `problem`: why none are listed (no NVML, no driver, ...)."""

    gpus: list[GpuInfo] = field(default_factory=list)
    problem: str | None = None
    driver: str | None = None

    def describe(self) -> str:
        if self.gpus:
            return f"{len(self.gpus)} NVIDIA GPU(s), driver {self.driver or '?'}"
        return self.problem or "no NVIDIA GPU"


def _nvml():
    """The pynvml module, or None when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_report() -> GpuReport:
    """Every NVIDIA GPU of the host with its memory, utilisation and processes, read through NVML."""
    nv = _nvml()
    if nv is None:
        return GpuReport(problem="GPU facts unavailable: nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        no_driver = tuple(
            getattr(nv, n) for n in ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded") if hasattr(nv, n)
        )
        if isinstance(exc, no_driver):
            return GpuReport(problem=f"no NVIDIA driver ({exc})")
        return GpuReport(problem=f"NVML could not start: {exc}")
    try:
        driver = _text(nv.nvmlSystemGetDriverVersion())
        out = [_device(nv, i) for i in range(nv.nvmlDeviceGetCount())]
    except nv.NVMLError as exc:
        return GpuReport(problem=f"NVML failed: {exc}")
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass
    return GpuReport(gpus=out, driver=driver, problem=None if out else "the NVIDIA driver lists no GPU")


def _device(nv, index: int) -> GpuInfo:
    handle = nv.nvmlDeviceGetHandleByIndex(index)
    mem = nv.nvmlDeviceGetMemoryInfo(handle)

    def optional(fn, *args):
        try:
            return fn(handle, *args)
        except nv.NVMLError:  # not supported on this GPU (MIG, vGPU) or not allowed for this user
            return None

    rates = optional(nv.nvmlDeviceGetUtilizationRates)
    capability = optional(nv.nvmlDeviceGetCudaComputeCapability)
    procs = optional(nv.nvmlDeviceGetComputeRunningProcesses) or []
    return GpuInfo(
        index=index,
        name=_text(nv.nvmlDeviceGetName(handle)),
        total_bytes=int(mem.total),
        used_bytes=int(mem.used),
        uuid=_text(optional(nv.nvmlDeviceGetUUID) or ""),
        utilization=int(rates.gpu) if rates is not None else None,
        capability=tuple(int(v) for v in capability) if capability is not None else None,
        pids=tuple(int(p.pid) for p in procs),
    )


def gpus() -> list[GpuInfo]:
    """The NVIDIA GPUs with their memory in use (empty list: no driver, no NVML, or none there)."""
    return gpu_report().gpus


def visible_gpus(report: GpuReport | None = None) -> list[GpuInfo]:
    """The GPUs this process may use: those CUDA_VISIBLE_DEVICES names (when set), else every one."""
    report = report or gpu_report()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return report.gpus
    ids = [v for v in visible.split(",") if v.strip()]
    return [g for gid in ids for g in report.gpus if g.matches(gid)]


def bf16_supported(devices: list[GpuInfo]) -> bool:
    """bf16 autocast runs on every one of `devices` (a GPU whose capability NVML does not report counts
    as able: the trainer's first step would say otherwise)."""
    return all(g.capability is None or g.capability >= BF16_CAPABILITY for g in devices)


def folder_size(path: Path) -> int:
    """Bytes in files under `path` (links not followed); 0 for a missing folder."""
    total = 0
    stack = [Path(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def disk_usage(settings: Settings) -> dict[str, int]:
    """Bytes used by datasets/, models/, registry/ and the caches, plus the free space on the home's disk."""
    usage = {
        "datasets": folder_size(settings.datasets_dir),
        "models": folder_size(settings.models_dir),
        "registry": folder_size(settings.registry_dir),
        "cache": folder_size(settings.cache_dir),
    }
    usage["free"] = shutil.disk_usage(settings.home).free
    return usage


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
