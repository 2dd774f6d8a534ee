"""What `zimage.training.memory.estimate_memory` returns: GiB per item and phase, and how it reads out.

Plain data and formatting only (no torch, no model shapes), so pages can show an estimate cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3


@dataclass
class MemoryEstimate:
    """GiB per item for each phase of a run (latent_caching, text_caching, training, sampling).

    Each phase's items sum to its total; `total_gib` is the largest phase (`peak_phase`).
    """

    phases: dict[str, dict[str, float]]
    params: dict[str, int]  # transformer, text_encoder, vae, trainable
    tokens: dict[str, int]  # per sample: image, caption, main; and batch
    architecture: str
    notes: list[str] = field(default_factory=list)

    @property
    def phase_totals(self) -> dict[str, float]:
        return {name: sum(items.values()) for name, items in self.phases.items()}

    @property
    def peak_phase(self) -> str:
        totals = self.phase_totals
        return max(totals, key=totals.__getitem__)

    @property
    def total_gib(self) -> float:
        return self.phase_totals[self.peak_phase]

    @property
    def training_gib(self) -> float:
        return self.phase_totals["training"]

    @property
    def device_gib(self) -> float:
        """What the card needs: the peak plus allocator slack (~5%) and the CUDA context (~0.75 GiB)."""
        return self.total_gib * 1.05 + 0.75

    def item(self, phase: str, name: str) -> float:
        return self.phases.get(phase, {}).get(name, 0.0)

    def to_dict(self) -> dict[str, Any]:
        r = lambda v: round(v, 3)  # noqa: E731
        return {
            "total_gib": r(self.total_gib),
            "device_gib": r(self.device_gib),
            "peak_phase": self.peak_phase,
            "phase_totals": {k: r(v) for k, v in self.phase_totals.items()},
            "phases": {p: {k: r(v) for k, v in items.items()} for p, items in self.phases.items()},
            "params": dict(self.params),
            "tokens": dict(self.tokens),
            "architecture": self.architecture,
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """A few lines for logs and the terminal."""
        lines = [
            f"Estimated peak {self.total_gib:.1f} GiB ({self.peak_phase}); the card needs about {self.device_gib:.1f} GiB"
        ]
        for phase, items in self.phases.items():
            parts = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in items.items() if v >= 0.005) or "each < 0.01"
            lines.append(f"  {phase.replace('_', ' ')} {self.phase_totals[phase]:.2f} GiB: {parts}")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])
