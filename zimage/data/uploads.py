"""Checked uploads into a dataset: single files, a folder, or a zip archive.

Every file is hostile until checked (DESIGN.md section 7). A file is accepted only if its name is
harmless, it is an allowed format (png, jpg, webp, bmp, tiff) that decodes fully, it is within the
byte and pixel limits (decompression bombs) and its content is not already in the dataset. Zip members
that would land outside the folder, symlinks, encrypted or oversized members are refused. Each refusal
carries a reason for the person; accepted images get safe names, and a `.txt` caption that travels with
an image (same folder and stem, in a zip, a folder or the same upload) is kept with it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from zimage.auth import audited
from zimage.data.folders import DatasetFolder
from zimage.data.manage import clean_caption, image_hashes, image_root, refresh_count
from zimage.data.ownership import on_dataset_folder
from zimage.errors import UserError
from zimage.fsio import atomic_write, fsync_file, place, temp_file

# PIL format name -> the extension the stored file gets (a JPEG named .png is stored as .jpg).
FORMAT_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
UPLOAD_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "zip", "txt")  # for st.file_uploader
# Files that operating systems add to folders and archives; skipped without a message.
_SYSTEM_FILES = {".ds_store", "thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int = 100 * 1024 * 1024  # one image
    max_pixels: int = 80_000_000  # about 9k x 9k; above PIL's own bomb warning is never reached
    min_side: int = 16  # smaller than this is not a training image
    max_caption_bytes: int = 64 * 1024
    max_files: int = 10_000  # entries in one upload (zip members included)
    max_total_bytes: int = 8 * 1024**3  # everything one zip may expand to


@dataclass
class Accepted:
    source: str  # the name as uploaded (zip member path included)
    stored: str  # the file name in the dataset
    width: int
    height: int
    caption: bool = False


@dataclass
class Refused:
    source: str
    reason: str


@dataclass
class UploadReport:
    accepted: list[Accepted] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # system files (.DS_Store, __MACOSX/...)

    def refuse(self, source: str, reason: str) -> None:
        self.refused.append(Refused(source, reason))

    def summary(self) -> str:
        parts = [f"{len(self.accepted)} image(s) added"]
        captions = sum(1 for a in self.accepted if a.caption)
        if captions:
            parts.append(f"{captions} with caption")
        if self.refused:
            parts.append(f"{len(self.refused)} refused")
        return ", ".join(parts)

    def rows(self) -> list[dict]:
        """One row per file for a table: file, result, detail."""
        rows = [
            {
                "file": a.source,
                "result": "added",
                "detail": f"{a.stored} ({a.width}x{a.height})" + (", caption" if a.caption else ""),
            }
            for a in self.accepted
        ]
        rows += [{"file": r.source, "result": "refused", "detail": r.reason} for r in self.refused]
        return rows


@dataclass
class UploadEntry:
    """One incoming file: its name as given (may contain folders) and a way to read at most n bytes."""

    name: str
    size: int | None
    read: Callable[[int], bytes]
    display: str = ""  # how the report names it (e.g. "photos.zip: a/b.png"); default: name

    @property
    def shown(self) -> str:
        return self.display or self.name


class Refusal(UserError):
    """Why one file was refused (internal; becomes a Refused row)."""


# -- names ----------------------------------------------------------------------------------------
def safe_relative(name: str) -> PurePosixPath:
    """The entry's path inside the upload; refuses anything that would leave the target folder."""
    raw = name.replace("\\", "/")
    if not raw or "\x00" in raw:
        raise Refusal("empty or invalid file name")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise Refusal("absolute path: would be written outside the dataset folder")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise Refusal("path contains '..': would be written outside the dataset folder")
    if not parts:
        raise Refusal("empty or invalid file name")
    return PurePosixPath(*parts)


def safe_stem(stem: str) -> str:
    """A stored name from a person's file name: lowercase letters, digits, '-' and '_' only."""
    cleaned = re.sub(r"[^a-z0-9_-]+", "-", stem.lower()).strip("-_")[:60]
    return cleaned or "image"


def _taken_stems(folder: DatasetFolder) -> set[str]:
    root = image_root(folder)
    return {p.stem.lower() for p in root.iterdir()} if root.is_dir() else set()


# -- checks ---------------------------------------------------------------------------------------
def inspect_image(data: bytes, limits: UploadLimits) -> tuple[str, int, int]:
    """(PIL format, width, height) of image bytes that decode fully within the limits, else Refusal."""
    if not data:
        raise Refusal("the file is empty (0 bytes)")
    try:
        # PIL only warns between its two bomb limits; record the warning and apply our own, lower limit.
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format, img.size
                if fmt not in FORMAT_EXTENSIONS:
                    raise Refusal(f"{fmt} images are not allowed (allowed: png, jpg, webp, bmp, tiff)")
                if w * h > limits.max_pixels:
                    raise Refusal(
                        f"{w}x{h} is {w * h:,} pixels, over the limit of {limits.max_pixels:,} "
                        "(decompression bomb guard)"
                    )
                if min(w, h) < limits.min_side:
                    raise Refusal(f"{w}x{h} is too small (under {limits.min_side} px on a side)")
                img.load()  # decode every pixel: truncated or corrupt data fails here, not in training
    except Refusal:
        raise
    except UnidentifiedImageError:
        raise Refusal("not an image: the content does not decode as png, jpg, webp, bmp or tiff") from None
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise Refusal(f"{count}, over the limit of {limits.max_pixels:,} (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise Refusal(f"damaged or truncated image ({str(exc)[:120]})") from None
    return fmt, w, h


def _read_bounded(entry: UploadEntry, limit: int, what: str) -> bytes:
    if entry.size is not None and entry.size > limit:
        raise Refusal(f"{what} is {entry.size / 1e6:.1f} MB, over the limit of {limit / 1e6:.0f} MB")
    data = entry.read(limit + 1)
    if len(data) > limit:
        raise Refusal(f"{what} is over the limit of {limit / 1e6:.0f} MB")
    return data


# -- storing --------------------------------------------------------------------------------------
def _store(folder: DatasetFolder, stem: str, ext: str, data: bytes) -> str:
    """Write `data` under a fresh `<stem>[-n]<ext>` name; never overwrites. Returns the stored name."""
    root = image_root(folder)
    root.mkdir(parents=True, exist_ok=True)
    with temp_file(root, prefix=".upload-") as tmp:  # published under the first free name below
        tmp.write_bytes(data)
        fsync_file(tmp)
        taken = _taken_stems(folder)
        for n in range(1, 100_000):
            candidate = stem if n == 1 else f"{stem}-{n}"
            if candidate in taken:  # a caption or an image with another extension owns this stem
                continue
            try:
                place(tmp, root / f"{candidate}{ext}", overwrite=False)  # fails if the name appeared meanwhile
            except FileExistsError:
                continue
            return f"{candidate}{ext}"
        raise Refusal("no free file name")  # pragma: no cover


def import_entries(
    folder: DatasetFolder,
    entries: Iterable[UploadEntry],
    limits: UploadLimits | None = None,
    report: UploadReport | None = None,
) -> UploadReport:
    """Check and store a batch of entries (images and .txt captions); zips are opened in place."""
    limits = limits or UploadLimits()
    report = report if report is not None else UploadReport()
    if not folder.exists():
        raise UserError(f"dataset {folder.path.name!r}: does not exist; create it first")
    images: list[tuple[PurePosixPath, UploadEntry]] = []
    captions: dict[tuple[str, str], tuple[PurePosixPath, UploadEntry]] = {}
    for count, entry in enumerate(entries):
        if count >= limits.max_files:
            report.refuse(entry.shown, f"more than {limits.max_files} files in one upload; upload the rest separately")
            continue
        try:
            rel = safe_relative(entry.name)
        except Refusal as exc:
            report.refuse(entry.shown, str(exc))
            continue
        if rel.name.lower() in _SYSTEM_FILES or rel.parts[0] == "__MACOSX" or rel.name.startswith("._"):
            report.skipped.append(entry.shown)
            continue
        suffix = rel.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.append((rel, entry))
        elif suffix == ".txt":
            captions[(str(rel.parent), rel.stem)] = (rel, entry)
        elif suffix == ".zip":
            try:
                archive = _read_bounded(entry, limits.max_total_bytes, "the zip file")
            except Refusal as exc:
                report.refuse(entry.shown, str(exc))
                continue
            add_zip(folder, archive, limits, report, label=entry.shown)
        else:
            report.refuse(entry.shown, f"{suffix or 'no extension'}: not an allowed format (allowed: png, jpg, webp, bmp, tiff, zip, txt)")  # fmt: skip

    known = set(image_hashes(folder).values())
    for rel, entry in images:
        try:
            data = _read_bounded(entry, limits.max_file_bytes, "the file")
            fmt, w, h = inspect_image(data, limits)
            digest = hashlib.sha256(data).hexdigest()
            if digest in known:
                raise Refusal("duplicate: the same image is already in the dataset (or earlier in this upload)")
            caption_text = None
            cap = captions.pop((str(rel.parent), rel.stem), None)
            if cap is not None:
                caption_text = _read_caption(cap[1], limits)
            stored = _store(folder, safe_stem(rel.stem), FORMAT_EXTENSIONS[fmt], data)
        except Refusal as exc:
            report.refuse(entry.shown, str(exc))
            captions.pop((str(rel.parent), rel.stem), None)  # its caption goes with it
            continue
        known.add(digest)
        if caption_text is not None:
            atomic_write(image_root(folder) / f"{Path(stored).stem}.txt", caption_text + "\n")
        report.accepted.append(Accepted(entry.shown, stored, w, h, caption=caption_text is not None))
    for _rel, entry in captions.values():
        report.refuse(entry.shown, "caption without an image of the same name; not added")
    refresh_count(folder)
    return report


def _read_caption(entry: UploadEntry, limits: UploadLimits) -> str:
    data = _read_bounded(entry, limits.max_caption_bytes, "the caption file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")  # old editors on Windows; better than losing the caption
    try:
        return clean_caption(text)
    except UserError as exc:
        raise Refusal(str(exc)) from None


# -- sources --------------------------------------------------------------------------------------
def _bytes_entry(name: str, data: bytes) -> UploadEntry:
    return UploadEntry(name=name, size=len(data), read=lambda n: data[:n])


@audited("dataset.upload", on_dataset_folder)
def add_files(
    folder: DatasetFolder, files: Iterable[tuple[str, bytes]], limits: UploadLimits | None = None
) -> UploadReport:
    """Uploaded files as (name, bytes) pairs, e.g. from st.file_uploader; zips among them are opened."""
    return import_entries(folder, (_bytes_entry(n, d) for n, d in files), limits)


def _zip_entries(zf: zipfile.ZipFile, label: str, limits: UploadLimits, report: UploadReport) -> list[UploadEntry]:
    entries = []
    members = [i for i in zf.infolist() if not i.is_dir()]
    declared = sum(i.file_size for i in members)
    if declared > limits.max_total_bytes:
        report.refuse(label, f"expands to {declared / 1e9:.1f} GB, over the limit of {limits.max_total_bytes / 1e9:.0f} GB")  # fmt: skip
        return []
    for info in members:
        shown = f"{label}: {info.filename}"
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            report.refuse(shown, "symbolic link inside the zip: not followed")
        elif info.flag_bits & 0x1:
            report.refuse(shown, "encrypted zip member: cannot be read")
        elif PurePosixPath(info.filename.replace("\\", "/")).suffix.lower() == ".zip":
            report.refuse(shown, "zip inside a zip: not opened; unpack it first")
        else:
            entries.append(UploadEntry(info.filename, info.file_size, _zip_reader(zf, info), display=shown))
    return entries


def _zip_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[int], bytes]:
    # zipfile stops at the member's declared size, so a lying header cannot flood memory.
    def read(n: int) -> bytes:
        try:
            with zf.open(info) as fh:
                return fh.read(n)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
            raise Refusal(f"damaged zip member ({str(exc)[:120]})") from None
        except Exception as exc:  # zlib.error and friends from a corrupt stream
            raise Refusal(f"damaged zip member ({type(exc).__name__})") from None

    return read


@audited("dataset.upload", on_dataset_folder)
def add_zip(
    folder: DatasetFolder,
    archive: Path | str | bytes,
    limits: UploadLimits | None = None,
    report: UploadReport | None = None,
    label: str | None = None,
) -> UploadReport:
    """Import the images (and same-stem .txt captions) of a zip archive, given as a path or bytes."""
    limits = limits or UploadLimits()
    report = report if report is not None else UploadReport()
    label = label or (Path(archive).name if not isinstance(archive, bytes) else "upload.zip")
    try:
        zf = zipfile.ZipFile(io.BytesIO(archive) if isinstance(archive, bytes) else Path(archive))
    except (zipfile.BadZipFile, OSError) as exc:
        report.refuse(label, f"not a readable zip archive ({str(exc)[:120]})")
        return report
    with zf:
        entries = _zip_entries(zf, label, limits, report)
        if entries:
            import_entries(folder, entries, limits, report)
    return report


@audited("dataset.upload", on_dataset_folder)
def add_folder(folder: DatasetFolder, source: Path | str, limits: UploadLimits | None = None) -> UploadReport:
    """Import a folder on this machine (subfolders included); symlinks are not followed."""
    source = Path(source).expanduser()
    if not source.is_dir():
        raise UserError(f"folder: {source} does not exist or is not a folder")
    report = UploadReport()
    entries = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(source).as_posix()
            if path.is_symlink():
                report.refuse(rel, "symbolic link: not followed")
                continue
            entries.append(UploadEntry(name=rel, size=path.lstat().st_size, read=_file_reader(path)))
    return import_entries(folder, entries, limits, report)


def _file_reader(path: Path) -> Callable[[int], bytes]:
    def read(n: int) -> bytes:
        try:
            with open(path, "rb") as fh:
                return fh.read(n)
        except OSError as exc:
            raise Refusal(f"cannot be read ({exc.strerror or exc})") from None

    return read
