"""Create, edit, list and delete datasets; read, write and bulk-edit their captions; delete images.

Every name that comes from a person is checked before it touches the disk: dataset names are safe
slugs, image names must be files that are already in the dataset (so `../x` or `/etc/passwd` can never
be addressed), and captions are written atomically. Pages and the CLI call these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from zimage.auth import acting, audited
from zimage.data.folders import DATASET_TYPES, DatasetFolder, DatasetInfo, DatasetItem, check_slug
from zimage.data.ownership import on_dataset_folder, on_dataset_name, on_new_dataset
from zimage.errors import UserError
from zimage.fsio import atomic_write
from zimage.records import Damaged
from zimage.settings import Settings

MIN_RESOLUTION, MAX_RESOLUTION = 64, 4096
MAX_CAPTION_CHARS = 20_000
_TEXT_LIMITS = {"trigger_word": 200, "description": 2000, "caption_prefix": 500, "caption_suffix": 500}
EDITABLE_FIELDS = ("type", "trigger_word", "description", "resolution", "caption_prefix", "caption_suffix")


class DatasetError(UserError):
    """A dataset request that cannot be done; the message names the dataset, field or file."""


# -- datasets -------------------------------------------------------------------------------------
def dataset_folder(settings: Settings, name: str) -> DatasetFolder:
    """The folder for dataset `name` (checked as a slug); it need not exist."""
    return DatasetFolder(settings.datasets_dir / check_slug(name, "dataset name"))


def open_dataset(settings: Settings, name: str) -> DatasetFolder:
    """An existing dataset, or a DatasetError saying it is not there."""
    folder = dataset_folder(settings, name)
    if not folder.exists():
        raise DatasetError(f"dataset {name!r}: no such dataset in {settings.datasets_dir}")
    return folder


def _clean_fields(fields: dict) -> dict:
    """Validate the person-editable fields of dataset.json; returns them normalised."""
    out = {}
    for key, value in fields.items():
        if key not in EDITABLE_FIELDS:
            raise DatasetError(f"{key}: not a dataset setting (editable: {', '.join(EDITABLE_FIELDS)})")
        if key == "type":
            if value not in DATASET_TYPES:
                raise DatasetError(f"type: {value!r} must be one of {', '.join(DATASET_TYPES)}")
        elif key == "resolution":
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise DatasetError(f"resolution: {value!r} is not a whole number of pixels") from None
            if not MIN_RESOLUTION <= value <= MAX_RESOLUTION or value % 16:
                raise DatasetError(
                    f"resolution: {value} must be a multiple of 16 between {MIN_RESOLUTION} and {MAX_RESOLUTION}"
                )
        else:
            value = "" if value is None else str(value)
            value = value.strip()
            if key != "description" and ("\n" in value or "\r" in value):
                raise DatasetError(f"{key}: must be a single line")
            if len(value) > _TEXT_LIMITS[key]:
                raise DatasetError(f"{key}: is {len(value)} characters long; the limit is {_TEXT_LIMITS[key]}")
        out[key] = value
    return out


@audited("dataset.create", on_new_dataset)
def create_dataset(settings: Settings, name: str, /, **fields) -> DatasetFolder:
    """Create `datasets/<name>/` with an empty images/ folder and dataset.json.

    Refuses an unsafe or empty name and never reuses an existing folder.
    """
    check_slug(name, "dataset name")
    clean = _clean_fields(fields)
    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    folder = DatasetFolder(settings.datasets_dir / name)
    try:
        folder.path.mkdir()  # atomic: two people creating the same name cannot both succeed
    except FileExistsError:
        what = "a dataset" if folder.exists() else "a folder that is not a dataset"
        raise DatasetError(f"dataset name: {name!r} is already taken by {what}; choose another name") from None
    try:
        folder.images_dir.mkdir()
        who = acting() if settings.home_settings().auth.mode != "none" else None  # mode none: no owner kept
        folder.write_info(DatasetInfo(name=name, owner=who.name if who else "", **clean))
    except BaseException:
        shutil.rmtree(folder.path, ignore_errors=True)
        raise
    return folder


@audited("dataset.edit", on_dataset_name)
def update_dataset(settings: Settings, name: str, /, **fields) -> DatasetInfo:
    """Change editable settings of an existing dataset; returns the new info."""
    folder = open_dataset(settings, name)
    clean = _clean_fields(fields)
    info = folder.read_info()
    for key, value in clean.items():
        setattr(info, key, value)
    info.name = name  # the folder name is the identity; a stale name in the file is corrected
    folder.write_info(info)
    return info


@audited("dataset.delete", on_dataset_name)
def delete_dataset(settings: Settings, name: str) -> None:
    """Remove a dataset folder. It is renamed to a hidden name first, so it vanishes from lists at once."""
    folder = open_dataset(settings, name)
    trash = Path(tempfile.mkdtemp(prefix=f".deleting-{name}-", dir=settings.datasets_dir))
    os.rename(folder.path, trash / name)
    shutil.rmtree(trash, ignore_errors=True)


def refresh_count(folder: DatasetFolder) -> None:
    """Keep dataset.json's num_images in step with the images folder."""
    if folder.exists():
        folder.write_info(folder.read_info())


def dataset_rows(settings: Settings) -> list[dict]:
    """One row per dataset for tables: name, type, trigger word, images, captioned, resolution, description."""
    from zimage.data.folders import list_datasets

    rows = []
    for folder in list_datasets(settings.datasets_dir):
        info = folder.info_or_problem()
        items = folder.items()
        if isinstance(info, Damaged):  # shown with its reason; the other datasets are not affected
            rows.append(
                {
                    "name": folder.path.name, "type": "damaged", "trigger word": "", "images": len(items),
                    "captioned": sum(1 for i in items if i.caption_path.exists()), "resolution": None,
                    "description": info.problem, "problem": info.problem,
                }
            )  # fmt: skip
            continue
        rows.append(
            {
                "name": folder.path.name,
                "type": info.type,
                "trigger word": info.trigger_word,
                "images": len(items),
                "captioned": sum(1 for i in items if i.caption_path.exists()),
                "resolution": info.resolution,
                "description": info.description,
                "problem": "",
            }
        )
    return rows


# -- images and captions --------------------------------------------------------------------------
def image_root(folder: DatasetFolder) -> Path:
    """Where a dataset's images live: images/, or the folder itself for a flat folder made by hand
    (new files go where the old ones are, so DatasetFolder.items() keeps seeing all of them)."""
    if folder.images_dir.is_dir():
        return folder.images_dir
    return folder.path if folder.items() else folder.images_dir


def find_item(folder: DatasetFolder, image_name: str) -> DatasetItem:
    """The dataset item called `image_name` (a bare file name already in the dataset)."""
    if not isinstance(image_name, str) or Path(image_name).name != image_name or image_name in ("", ".", ".."):
        raise DatasetError(f"image: {image_name!r} is not a file name in dataset {folder.path.name!r}")
    for item in folder.items():
        if item.image.name == image_name:
            return item
    raise DatasetError(f"image: {image_name!r} is not in dataset {folder.path.name!r}")


def clean_caption(text: str) -> str:
    """Captions are one paragraph: trimmed, with line breaks turned into spaces."""
    text = " ".join(str(text or "").replace("\r", "\n").split("\n")).strip()
    if len(text) > MAX_CAPTION_CHARS:
        raise DatasetError(f"caption: is {len(text)} characters long; the limit is {MAX_CAPTION_CHARS}")
    return text


@audited("dataset.caption.edit", on_dataset_folder)
def write_caption(folder: DatasetFolder, image_name: str, text: str) -> Path:
    """Save the caption of one image (atomically); returns the caption path."""
    item = find_item(folder, image_name)
    atomic_write(item.caption_path, clean_caption(text) + "\n")
    return item.caption_path


@audited("dataset.images.delete", on_dataset_folder)
def delete_images(folder: DatasetFolder, image_names: list[str]) -> list[str]:
    """Delete images with their captions and cached thumbnails; returns the names deleted."""
    from zimage.data.thumbnails import drop_thumbnails

    items = [find_item(folder, n) for n in image_names]  # check every name before deleting anything
    deleted = []
    for item in items:
        for path in (item.image, item.caption_path):
            path.unlink(missing_ok=True)
        drop_thumbnails(folder, item.image.name)
        deleted.append(item.image.name)
    refresh_count(folder)
    return deleted


def join_prefix(prefix: str, caption: str) -> str:
    """`prefix` in front of `caption`, exactly as typed: a prefix ending in a space is followed directly, one
    ending in , ; or : gets a space ("sks," never runs into "sks,a"), any other gets ', '."""
    if not prefix:
        return caption
    if not caption:
        return prefix.rstrip(" ,;:")
    sep = "" if prefix[-1].isspace() else " " if prefix[-1] in ",;:" else ", "
    return f"{prefix}{sep}{caption}"


def join_suffix(caption: str, suffix: str) -> str:
    if not suffix:
        return caption
    if not caption:
        return suffix.lstrip(" ,;:.")
    sep = "" if suffix[0].isspace() or suffix[0] in ",;:." else ", "
    return f"{caption}{sep}{suffix}"


@dataclass
class CaptionChange:
    image: str
    before: str | None  # None: there was no caption file
    after: str


@audited("dataset.bulk_captions.edit", on_dataset_folder, unless=lambda *a, dry_run=False, **k: dry_run)
def bulk_edit_captions(
    folder: DatasetFolder,
    *,
    prefix: str = "",
    suffix: str = "",
    find: str = "",
    replace: str = "",
    image_names: list[str] | None = None,
    include_uncaptioned: bool = False,
    dry_run: bool = False,
) -> list[CaptionChange]:
    """Find-and-replace, then add a prefix and/or suffix, over the captions of a dataset.

    A prefix or suffix that a caption already has is not added twice. Images without a caption are
    left alone unless `include_uncaptioned` (then they get the prefix/suffix as their caption).
    Returns the captions that change; with `dry_run` nothing is written (a preview).
    """
    # What the person typed, kept exactly (a trailing space of the prefix is its separator); only line
    # breaks become spaces. The caption's own two ends are trimmed when it is written (clean_caption).
    prefix, suffix = (clean_caption(f"|{t}|")[1:-1] if t.strip() else "" for t in (prefix, suffix))
    if not (prefix or suffix or find):
        raise DatasetError("bulk edit: give a prefix, a suffix or a text to find")
    items = [find_item(folder, n) for n in image_names] if image_names is not None else folder.items()
    changes, paths = [], {}
    for item in items:
        before = item.caption
        if before is None and not include_uncaptioned:
            continue
        text = before or ""
        if find:
            text = text.replace(find, replace)
        if prefix and not text.startswith(prefix.rstrip(" ,;:")):
            text = join_prefix(prefix, text)
        if suffix and not text.endswith(suffix.lstrip(" ,;:.")):
            text = join_suffix(text, suffix)
        text = clean_caption(text)
        if text != before:
            changes.append(CaptionChange(item.image.name, before, text))
            paths[item.image.name] = item.caption_path
    if changes and not dry_run:
        from zimage.data.caption_undo import save_undo

        save_undo(folder, changes)  # first, so even an edit cut short half-way can be undone
        for change in changes:
            atomic_write(paths[change.image], change.after + "\n")
    return changes


# -- content hashes (duplicates) ------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_hashes(folder: DatasetFolder) -> dict[str, str]:
    """sha256 of every image file, by file name. Cached by (size, mtime), so only changed files are re-read."""
    cache_path = folder.cache_dir / "hashes.json"
    try:
        cached = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    fresh, out = {}, {}
    for item in folder.items():
        st = item.image.stat()
        key = f"{st.st_size}:{st.st_mtime_ns}"
        entry = cached.get(item.image.name)
        digest = entry["sha256"] if entry and entry.get("key") == key else file_sha256(item.image)
        fresh[item.image.name] = {"key": key, "sha256": digest}
        out[item.image.name] = digest
    if fresh != cached:
        try:
            atomic_write(cache_path, json.dumps(fresh))
        except OSError:  # a read-only dataset still works, just without the cache
            pass
    return out


def caption_change_rows(changes: list[CaptionChange]) -> list[dict]:
    return [asdict(c) for c in changes]
