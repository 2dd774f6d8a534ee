"""Where the studio keeps its data: one object, overridable by the ZIMAGE_HOME environment variable.

A team server keeps datasets, models and the registry on a big disk (ZIMAGE_HOME=/data/zimage); tests
point it at a temp folder. Without ZIMAGE_HOME the project folder itself is the home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    home: Path

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def base_models_dir(self) -> Path:
        return self.models_dir / "base"

    @property
    def adapter_dir(self) -> Path:
        return self.models_dir / "training_adapter"

    @property
    def loras_dir(self) -> Path:
        return self.models_dir / "loras" / "trained"

    @property
    def finetuned_dir(self) -> Path:
        return self.models_dir / "finetuned"

    @property
    def captioners_dir(self) -> Path:
        return self.models_dir / "captioners"

    @property
    def registry_dir(self) -> Path:
        return self.home / "registry"

    @property
    def runs_dir(self) -> Path:
        return self.registry_dir / "runs"

    @property
    def db_path(self) -> Path:
        return self.registry_dir / "registry.duckdb"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    def ensure(self) -> Settings:
        """Create the data folders (cheap and idempotent)."""
        for d in (self.datasets_dir, self.base_models_dir, self.loras_dir, self.finetuned_dir, self.runs_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self


def get_settings() -> Settings:
    """Read ZIMAGE_HOME each call, so a test or a server can move the home without restarting Python."""
    home = os.environ.get("ZIMAGE_HOME")
    return Settings(home=Path(home).expanduser().resolve() if home else PROJECT_ROOT)
