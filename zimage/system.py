"""What the host has: GPUs and their memory, disk used by the data folders. For the Home page and `zimage`."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from zimage.settings import Settings


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    used_bytes: int  # by every process on the device, not just this one


def gpus() -> list[GpuInfo]:
    """The CUDA devices with their memory in use (empty list: CPU only)."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuInfo(i, torch.cuda.get_device_name(i), int(total), int(total - free)))
    return out


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
