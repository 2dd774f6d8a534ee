"""Writing files and folders so that a reader sees the old version or the new one whole, never half.

Every file the studio writes for another process to read (status.json, config.json, dataset.json,
captions, LoRA files, cache entries, thumbnails, sample images, checkpoints, model folders) goes through
this module. The pattern is always the same: write into a hidden temp name in the same folder (same
filesystem, so the rename is atomic), flush it to disk, then rename it into place.

    atomic_write(path, "text")                 # str or bytes
    write_json(path, {"state": "running"})     # the one JSON writer (indent 2, sorted keys)
    with atomic_path(path) as tmp:             # any writer that wants a file name (safetensors, PIL)
        save_file(tensors, tmp)
    with atomic_folder(target) as tmp:         # a whole folder (checkpoints, model folders)
        model.save_pretrained(tmp)

`overwrite=False` never replaces an existing file or folder: it raises FileExistsError and leaves the
existing one untouched (a hard link publishes a file under its name only if the name is free).
Standard library only: the rename dance is a dozen lines, and no maintained package covers folders
and "create only if absent" together (atomicwrites is archived).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_folder", "atomic_path", "atomic_write", "fsync_file", "fsync_tree", "place", "read_json", "temp_file",
    "write_json",
]  # fmt: skip


def fsync_file(path: Path | str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file below `folder` and the folder itself to disk."""
    for file in Path(folder).rglob("*"):
        if file.is_file():
            fsync_file(file)
    _fsync_dir(Path(folder))


def place(tmp: Path | str, path: Path | str, overwrite: bool = True) -> Path:
    """Rename the finished file `tmp` to `path`. Without `overwrite` an existing `path` raises
    FileExistsError and stays untouched (the temp file is then the caller's to remove)."""
    path = Path(path)
    if overwrite:
        os.replace(tmp, path)
        return path
    try:
        os.link(tmp, path)  # fails if the name exists: no window in which another file is replaced
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        if path.exists():
            raise FileExistsError(str(path)) from None
        os.replace(tmp, path)
        return path
    os.unlink(tmp)
    return path


@contextmanager
def temp_file(folder: Path | str, prefix: str = ".tmp-") -> Iterator[Path]:
    """A fresh hidden file name in `folder` (created empty), removed when the block ends unless it was
    renamed away (`place`) inside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_path(path: Path | str, overwrite: bool = True, fsync: bool = True) -> Iterator[Path]:
    """A temp file name beside `path`; when the block ends without an error the file takes `path`'s place.

    On an error (or a FileExistsError with `overwrite=False`) the temp file is removed and `path` is as
    it was.
    """
    path = Path(path)
    with temp_file(path.parent, prefix=f".{path.name}.") as tmp:
        yield tmp
        if fsync:
            fsync_file(tmp)
        place(tmp, path, overwrite=overwrite)


def atomic_write(path: Path | str, data: str | bytes, overwrite: bool = True, fsync: bool = True) -> Path:
    """Write `data` (text is UTF-8) to `path` atomically; returns `path`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, overwrite=overwrite, fsync=fsync) as tmp:
        tmp.write_bytes(raw)
    return Path(path)


def write_json(path: Path | str, obj: Any, overwrite: bool = True) -> Path:
    """The one JSON writer for files other processes read: indent 2, sorted keys, a final newline."""
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", overwrite=overwrite)


def read_json(path: Path | str, default: Any = None) -> Any:
    """A JSON file's content; a missing, unreadable or half-written file gives `default`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return default


@contextmanager
def atomic_folder(target: Path | str, overwrite: bool = False, fsync: bool = True) -> Iterator[Path]:
    """A hidden temp folder beside `target` that is renamed to `target` when the block succeeds.

    Without `overwrite` an existing `target` raises FileExistsError before anything is written. With it,
    the old folder is moved aside first and deleted after the rename, so a crash leaves one of them whole.
    On an error the temp folder is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not overwrite:
        raise FileExistsError(str(target))
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        if target.exists():
            if not overwrite:
                raise FileExistsError(str(target))
            old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            os.rename(target, old / target.name)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        if fsync:
            _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
