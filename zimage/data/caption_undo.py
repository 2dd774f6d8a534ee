"""Undo of the last bulk caption edit: the captions before it, kept in `<dataset>/.bulk_undo.json`.

`bulk_edit_captions` writes the record (through zimage.fsio) before it changes any caption, so the edit
can be undone after a page reload, from another process, or after a crash half-way through. Undo restores
each caption that still reads as the edit left it; one edited by hand since is kept and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel

from zimage.auth import audited
from zimage.data.folders import DatasetFolder
from zimage.data.ownership import on_dataset_folder
from zimage.errors import UserError
from zimage.fsio import atomic_write, write_json
from zimage.records import Damaged, Record, read_record

UNDO_FILE = ".bulk_undo.json"


class _Change(BaseModel):
    image: str
    before: str | None  # None: the image had no caption file
    after: str


class UndoRecord(Record):
    time: str = ""
    changes: list[_Change]

    @property
    def count(self) -> int:
        return len(self.changes)


@dataclass
class UndoResult:
    restored: list[str]  # images whose caption is back as it was
    kept: list[str]  # images whose caption changed again since the edit (left as they are)


class UndoError(UserError):
    """Nothing to undo, or an undo record that cannot be read; the message names the dataset or file."""


def save_undo(folder: DatasetFolder, changes: list) -> None:
    """Keep the captions before a bulk edit (CaptionChange objects), replacing the previous record."""
    record = {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "changes": [{"image": c.image, "before": c.before, "after": c.after} for c in changes],
    }
    write_json(folder.path / UNDO_FILE, record)


def _read(folder: DatasetFolder) -> UndoRecord | Damaged | None:
    return read_record(folder.path / UNDO_FILE, UndoRecord, missing=None)


def last_bulk_edit(folder: DatasetFolder) -> UndoRecord | None:
    """The bulk edit an undo would revert, or None (none yet, already undone, or a damaged record)."""
    record = _read(folder)
    return record if isinstance(record, UndoRecord) and record.changes else None


@audited("dataset.bulk_captions.undo", on_dataset_folder, verb="edit")
def undo_last_bulk_edit(folder: DatasetFolder) -> UndoResult:
    """Put back the captions the last bulk edit changed; raises UndoError when there is none."""
    record = _read(folder)
    if isinstance(record, Damaged):
        raise UndoError(
            f"undo: {UNDO_FILE} of dataset {folder.path.name!r} is damaged ({record.problem}); nothing changed"
        )
    if record is None or not record.changes:
        raise UndoError(f"undo: no bulk edit to undo in dataset {folder.path.name!r}")
    restored, kept = [], []
    items = {i.image.name: i for i in folder.items()}
    for change in record.changes:
        item = items.get(change.image)
        if item is None or item.caption != change.after:  # deleted, or edited again since: keep as it is
            kept.append(change.image)
        elif change.before is None:
            item.caption_path.unlink(missing_ok=True)
            restored.append(change.image)
        else:
            atomic_write(item.caption_path, change.before + "\n")
            restored.append(change.image)
    write_json(folder.path / UNDO_FILE, {"time": record.time, "changes": []})  # done: nothing left to undo
    return UndoResult(restored, kept)
