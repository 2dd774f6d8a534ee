"""Training configs: the TrainingConfig dataclass, its flat JSON/YAML form, presets and validation.

raw = read_config_file("my.yaml")               # or a dict from the Train page / a run's config.json
config = build_config(raw, preset="character_lora", overrides={"num_steps": 500})
resolved = validate_config(config, get_settings())  # ConfigError lists every problem at once
"""

from __future__ import annotations

from typing import Any

from zimage.config.presets import PRESETS, preset
from zimage.config.schema import (
    CONFIG_VERSION,
    DEFAULT_TARGET_MODULES,
    FIELD_NAMES,
    TARGET_BLOCKS,
    TARGET_MODULES,
    ConfigError,
    ConfigProblem,
    TrainingConfig,
    config_from_dict,
    parse_override,
    read_config_file,
)
from zimage.config.validate import MachineInfo, ResolvedConfig, resolve_dataset, validate_config

__all__ = [
    "CONFIG_VERSION",
    "DEFAULT_TARGET_MODULES",
    "FIELD_NAMES",
    "PRESETS",
    "TARGET_BLOCKS",
    "TARGET_MODULES",
    "ConfigError",
    "ConfigProblem",
    "MachineInfo",
    "ResolvedConfig",
    "TrainingConfig",
    "build_config",
    "config_from_dict",
    "parse_override",
    "preset",
    "read_config_file",
    "resolve_dataset",
    "validate_config",
]


def build_config(
    raw: dict[str, Any] | None = None, preset: str | None = None, overrides: dict[str, Any] | None = None
) -> TrainingConfig:
    """Defaults, then the preset, then `raw` (a file's content), then `overrides` (--set); later wins."""
    from zimage.config.presets import preset as get_preset
    from zimage.config.schema import flatten

    data: dict[str, Any] = dict(get_preset(preset)) if preset else {}
    data.update(flatten(raw or {}))
    data.update(overrides or {})
    return config_from_dict(data)
