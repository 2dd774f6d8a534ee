"""Who owns a dataset, and where `zimage.auth.audited` finds it (by name or folder) for its check and event.

A dataset's owner is `owner` in its dataset.json, written when it is created; a dataset made before
logins were on (or by `zimage demo`) has none, so only an admin may change it. Runs are located in
zimage.jobs.actions (their owner is `user` in status.json).

The dataset's own events.jsonl is written only outside mode none: a one-person home's dataset folders
stay exactly as they were (the home's events.jsonl has every event all the same).
"""

from __future__ import annotations

from pathlib import Path

from zimage.data.folders import DatasetFolder, check_slug
from zimage.records import Damaged
from zimage.settings import Settings


def dataset_owner(folder: DatasetFolder) -> str | None:
    info = folder.info_or_problem()
    owner = None if isinstance(info, Damaged) else info.owner  # a damaged file: unknown, admins only
    return owner or None


def settings_of(folder: DatasetFolder) -> Settings:
    """The home a dataset folder belongs to (datasets live in `<home>/datasets/<name>`)."""
    return Settings(home=Path(folder.path).resolve().parent.parent, why="the home of a dataset folder")


def _events_folder(settings: Settings, folder: DatasetFolder) -> Path | None:
    return folder.path if settings.home_settings().auth.mode != "none" else None


def on_dataset_name(settings: Settings, name: str, *args, **kwargs):
    folder = DatasetFolder(settings.datasets_dir / check_slug(name, "dataset name"))
    return settings, f"dataset:{name}", dataset_owner(folder), _events_folder(settings, folder)


def on_dataset_folder(folder: DatasetFolder, *args, **kwargs):
    settings = settings_of(folder)
    return settings, f"dataset:{folder.path.name}", dataset_owner(folder), _events_folder(settings, folder)


def on_new_dataset(settings: Settings, name: str, *args, **kwargs):
    return settings, f"dataset:{name}", None, None
