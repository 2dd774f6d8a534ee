"""Presets for the Train page: the shipped ones (zimage.config.presets) and the team's own, saved as
`<ZIMAGE_HOME>/presets/<name>.json` (flat partial configs, like the shipped ones: no dataset in them).
Also the form values of an earlier run (Clone).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from zimage.config import PRESETS, ConfigError, TrainingConfig, config_from_dict
from zimage.data.folders import BadName, check_slug
from zimage.errors import UserError
from zimage.fsio import write_json
from zimage.settings import Settings
from zimage.views.train_form import complete_values

# Fields a saved preset never holds: the dataset is chosen per run (as in the shipped presets).
NOT_IN_PRESETS = ("dataset_path", "config_version")


class PresetError(UserError):
    """A preset that cannot be saved or read."""


def presets_dir(settings: Settings) -> Path:
    return settings.home / "presets"


def preset_names(settings: Settings) -> list[str]:
    """Shipped presets first, then the saved ones in name order."""
    folder = presets_dir(settings)
    saved = sorted(p.stem for p in folder.glob("*.json") if p.stem not in PRESETS) if folder.is_dir() else []
    return list(PRESETS) + saved


def preset_label(name: str) -> str:
    from zimage.config.presets import PRESET_NOTES

    if name in PRESET_NOTES:
        return f"{name} ({PRESET_NOTES[name]})"
    return name if name in PRESETS else f"{name} (saved)"


def read_preset(settings: Settings, name: str) -> dict[str, Any]:
    """A preset's flat fields; a saved one is checked like a config file (unknown keys refused)."""
    if name in PRESETS:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[name].items()}
    check_slug(name, "preset name")
    path = presets_dir(settings) / f"{name}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PresetError(f"preset {name!r}: no such preset ({path})") from None
    except (OSError, ValueError) as exc:
        raise PresetError(f"preset {name!r}: {path} cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise PresetError(f"preset {name!r}: {path} must hold a mapping of field names to values")
    try:
        config_from_dict(data)
    except ConfigError as exc:
        raise PresetError(f"preset {name!r} ({path}): {exc}") from None
    return data


def preset_values(
    settings: Settings, name: str, current: Mapping[str, Any], taken: Iterable[str] = ()
) -> dict[str, Any]:
    """Complete form values for a preset, keeping the current dataset (and model, unless the preset names one)."""
    raw = read_preset(settings, name)
    keep = {k: current[k] for k in ("model_path", "dataset_path") if current.get(k) and k not in raw}
    if "model_path" in keep and "model_type" not in raw:
        keep["model_type"] = None  # follow the kept model
    return complete_values(settings, {**keep, **raw}, taken)


def save_preset(settings: Settings, name: str, values: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Save the form's values as a preset (without the dataset). Shipped names and existing files are refused."""
    try:
        check_slug(name, "preset name")
    except BadName as exc:
        raise PresetError(str(exc)) from None
    if name in PRESETS:
        raise PresetError(f"preset name: {name!r} is a shipped preset; choose another name")
    path = presets_dir(settings) / f"{name}.json"
    if path.exists() and not overwrite:
        raise PresetError(f"preset name: {name!r} exists already ({path}); tick 'replace' to overwrite it")
    data = {k: v for k, v in values.items() if k in TrainingConfig.__dataclass_fields__ and k not in NOT_IN_PRESETS}
    try:
        config_from_dict(data)
    except ConfigError as exc:
        raise PresetError(f"preset {name!r} not saved: {exc}") from None
    write_json(path, data)
    return path


def run_values(settings: Settings, config: Mapping[str, Any], taken: Iterable[str] = ()) -> dict[str, Any]:
    """Form values that repeat an earlier run's config (Clone); its output name gets a free variant."""
    try:
        parsed = config_from_dict(dict(config))
    except ConfigError as exc:
        raise PresetError(f"this run's config cannot be loaded into the form: {exc}") from None
    return complete_values(settings, parsed.to_dict(), taken)
