"""The Train page's memory estimate: peak, breakdown rows for the chart, tips, and whether it fits the GPUs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zimage.config import TrainingConfig
from zimage.settings import Settings
from zimage.system import GpuInfo

PHASE_LABELS = {
    "latent_caching": "latent caching",
    "text_caching": "text caching",
    "training": "training",
    "sampling": "sampling",
}


@dataclass
class MemoryView:
    """What the page shows: peak GiB (and its phase), what the card needs, the breakdown, advice."""

    peak_gib: float
    device_gib: float
    peak_phase: str
    rows: list[dict[str, Any]]  # phase, item, gib (for the stacked bar chart)
    training_items: dict[str, float]
    tips: list[str] = field(default_factory=list)
    fit: str = ""
    fits: bool | None = None  # None: no GPU to compare with


def _model_folder(config: TrainingConfig, settings: Settings) -> str:
    """The pipeline folder when the model is on disk, so the estimate reads its real shapes."""
    from zimage.catalogue import CatalogueError, resolve

    try:
        return str(resolve(config.model_path, settings)[1])
    except CatalogueError:
        return config.model_path


def memory_view(config: TrainingConfig, settings: Settings, gpus: list[GpuInfo] | None = None) -> MemoryView:
    """Estimate the run's peak memory (zimage.training.memory) and compare it with the GPUs (none: CPU only)."""
    from zimage.training.memory import estimate_memory, memory_savings

    cfg = config.replace(model_path=_model_folder(config, settings))
    est = estimate_memory(cfg)
    rows = [
        {"phase": PHASE_LABELS.get(phase, phase), "item": item.replace("_", " "), "gib": round(gib, 4)}
        for phase, items in est.phases.items()
        for item, gib in items.items()
        if gib > 0
    ]
    tips = [f"{advice} (saves {saved:.1f} GiB)" for advice, saved in memory_savings(cfg)[:3]]
    view = MemoryView(
        peak_gib=est.total_gib,
        device_gib=est.device_gib,
        peak_phase=PHASE_LABELS.get(est.peak_phase, est.peak_phase),
        rows=rows,
        training_items={k.replace("_", " "): v for k, v in est.phases["training"].items()},
        tips=tips,
    )
    if not gpus:
        view.fit = "CPU only: the run trains on the CPU here; the estimate is what a GPU would need."
    else:
        smallest = min(gpus, key=lambda g: g.total_bytes)
        total = smallest.total_bytes / 1024**3
        view.fits = view.device_gib <= total
        view.fit = (
            f"Fits: {smallest.name} has {total:.0f} GiB."
            if view.fits
            else f"Too big for {smallest.name} ({total:.0f} GiB): " + ("; ".join(tips[:2]) or "use a smaller setup")
        )
    return view
