"""Dataset folders on disk: `datasets/<name>/dataset.json` plus `images/<stem>.<ext>` and `<stem>.txt`.

The folder is the truth; dataset.json holds the settings a person chose (DESIGN.md section 2).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field

from zimage.data.images import is_image_name
from zimage.errors import UserError
from zimage.fsio import write_json
from zimage.records import Damaged, Record, read_record

DATASET_TYPES = ("character", "style", "concept")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class BadName(UserError):
    """A name that cannot become a folder or file name."""


def check_slug(name: str, what: str = "name") -> str:
    """Return `name` if it is a safe folder/file name, else raise with a message naming `what`."""
    if not isinstance(name, str) or not name.strip():
        raise BadName(f"{what}: must not be empty")
    if "/" in name or "\\" in name or ".." in name or os.path.isabs(name):
        raise BadName(f"{what}: {name!r} must not contain slashes or '..'")
    if not _SLUG.fullmatch(name):
        raise BadName(
            f"{what}: {name!r} must be 1-64 characters of lowercase letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class DatasetInfo:
    name: str
    type: str = "character"
    trigger_word: str = ""
    description: str = ""
    resolution: int = 1024
    num_images: int = 0
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    caption_prefix: str = ""
    caption_suffix: str = ""
    owner: str = ""  # who created it (zimage.auth: members change only their own); "" before logins were on

    @classmethod
    def from_dict(cls, data: dict) -> DatasetInfo:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class DatasetRecord(Record):
    """The schema of dataset.json as read back (hand edits included); unknown keys are kept and ignored."""

    name: str = ""
    type: Literal["character", "style", "concept"] = "character"
    trigger_word: str = ""
    description: str = ""
    resolution: int = Field(default=1024, ge=64, le=8192)
    num_images: int = Field(default=0, ge=0)
    created: str = ""
    caption_prefix: str = ""
    caption_suffix: str = ""
    owner: str = ""


class DamagedDataset(UserError):
    """dataset.json cannot be read; the message names the file and the field."""


@dataclass
class DatasetItem:
    image: Path
    caption_path: Path

    @property
    def caption(self) -> str | None:
        if not self.caption_path.exists():
            return None
        return self.caption_path.read_text(encoding="utf-8", errors="replace").strip()


class DatasetFolder:
    """One dataset folder; cheap to construct, reads the disk on each call."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def images_dir(self) -> Path:
        return self.path / "images"

    @property
    def info_path(self) -> Path:
        return self.path / "dataset.json"

    @property
    def cache_dir(self) -> Path:
        """Per-dataset cache folder (hidden, so it never shows up as data): hashes, thumbnails."""
        return self.path / ".cache"

    def exists(self) -> bool:
        return self.info_path.exists()

    def info_or_problem(self) -> DatasetInfo | Damaged:
        """dataset.json as a DatasetInfo (defaults when the file is absent), or the problem with it."""
        rec = read_record(self.info_path, DatasetRecord, missing=None)
        if rec is None:
            return DatasetInfo(name=self.path.name)
        if isinstance(rec, Damaged):
            return Damaged(rec.path, f"dataset {self.path.name}: {rec.problem}")
        return DatasetInfo.from_dict(rec.model_dump())

    def problem(self) -> str | None:
        """None when dataset.json reads cleanly, else why the dataset is damaged."""
        info = self.info_or_problem()
        return info.problem if isinstance(info, Damaged) else None

    def read_info(self) -> DatasetInfo:
        """dataset.json as a DatasetInfo; a damaged file raises DamagedDataset naming the field."""
        info = self.info_or_problem()
        if isinstance(info, Damaged):
            raise DamagedDataset(f"{info.problem} ({self.info_path}); fix or delete the file")
        return info

    def write_info(self, info: DatasetInfo) -> None:
        info.num_images = len(self.items())
        data = asdict(info)
        if not data["owner"]:  # mode none records no owner (zimage.auth); the file stays as it always was
            del data["owner"]
        write_json(self.info_path, data)

    def items(self) -> list[DatasetItem]:
        """Images (by extension) in name order, with their same-stem caption paths.

        Images live in images/; a flat folder of images with no images/ subfolder works too.
        """
        root = self.images_dir if self.images_dir.is_dir() else self.path
        if not root.is_dir():
            return []
        files = sorted(p for p in root.iterdir() if p.is_file() and is_image_name(p) and not p.name.startswith("."))
        return [DatasetItem(image=p, caption_path=p.with_suffix(".txt")) for p in files]


def list_datasets(datasets_dir: Path) -> list[DatasetFolder]:
    if not Path(datasets_dir).is_dir():
        return []
    return [DatasetFolder(p) for p in sorted(Path(datasets_dir).iterdir()) if (p / "dataset.json").exists()]
