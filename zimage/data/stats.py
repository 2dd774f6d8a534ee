"""Dataset statistics for the Datasets page: sizes, aspect-ratio buckets, captions.

Image sizes come from file headers (no decoding), so statistics of a few hundred images take well under
a second. Buckets are the training sizes an image is resized to at the dataset's resolution, computed with the
trainer's own rule (zimage.data.buckets).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from PIL import Image

from zimage.data.buckets import bucket_for, make_buckets
from zimage.data.folders import DatasetFolder

# EXIF orientations that swap width and height on display (and in training, which applies them).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
CAPTION_LENGTH_BINS = ((0, 0), (1, 5), (6, 15), (16, 30), (31, 60), (61, 120), (121, 10**9))


@lru_cache(maxsize=32)
def _buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    return tuple(make_buckets(resolution))


def bucket_at(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The training bucket (width, height) of an image at this resolution (zimage.data.buckets' rule)."""
    return bucket_for(width, height, list(_buckets(resolution)))


def read_size(path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            w, h = img.size
            try:
                orientation = img.getexif().get(0x0112)
            except Exception:  # a broken EXIF block must not hide the size
                orientation = None
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


@dataclass
class ImageFacts:
    name: str
    width: int | None
    height: int | None
    caption: str | None  # None: no caption file
    problem: str = ""  # why the header could not be read

    @property
    def caption_words(self) -> int | None:
        return None if self.caption is None else len(self.caption.split())


def image_facts(folder: DatasetFolder) -> list[ImageFacts]:
    facts = []
    for item in folder.items():
        try:
            w, h = read_size(item.image)
            facts.append(ImageFacts(item.image.name, w, h, item.caption))
        except Exception as exc:  # any unreadable header is a fact about the file, not a crash
            facts.append(ImageFacts(item.image.name, None, None, item.caption, problem=f"{type(exc).__name__}: {exc}"))
    return facts


@dataclass
class DatasetStats:
    resolution: int
    images: int = 0
    captioned: int = 0
    uncaptioned: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    resolutions: dict[str, int] = field(default_factory=dict)  # "WxH" -> images
    buckets: dict[str, int] = field(default_factory=dict)  # "WxH" bucket at the dataset resolution -> images
    below: dict[str, int] = field(default_factory=dict)  # bucket -> images smaller than it (upscaled in training)
    caption_words: list[int] = field(default_factory=list)
    caption_length_bins: dict[str, int] = field(default_factory=dict)  # "6-15 words" -> captions

    def table(self, counts: dict[str, int], label: str) -> list[dict]:
        return [{label: k, "images": v} for k, v in counts.items()]

    def bucket_rows(self) -> list[dict]:
        """Per training bucket (largest first): its images and how many of them are below it (upscaled)."""
        return [
            {"bucket": b, "images": n, "below training size": self.below.get(b, 0)} for b, n in self.buckets.items()
        ]


def size_key(label: str) -> tuple[int, int]:
    """Sort key of a "WxH" label: by pixel count, then width (so a chart of sizes reads small to large)."""
    w, _, h = label.partition("x")
    return (int(w) * int(h), int(w)) if w.isdigit() and h.isdigit() else (0, 0)


def by_size(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: size_key(kv[0])))


def _bin_label(lo: int, hi: int) -> str:
    if lo == hi:
        return f"{lo} words"
    return f"{lo}+ words" if hi >= 10**9 else f"{lo}-{hi} words"


def dataset_stats(folder: DatasetFolder, facts: list[ImageFacts] | None = None) -> DatasetStats:
    info = folder.read_info()
    facts = image_facts(folder) if facts is None else facts
    stats = DatasetStats(resolution=info.resolution, images=len(facts))
    sizes, bucket_counts, below = Counter(), Counter(), Counter()
    for f in facts:
        if f.caption is None:
            stats.uncaptioned.append(f.name)
        else:
            stats.captioned += 1
            stats.caption_words.append(f.caption_words or 0)
        if f.width is None:
            stats.unreadable.append(f.name)
            continue
        sizes[f"{f.width}x{f.height}"] += 1
        bw, bh = bucket_at(f.width, f.height, info.resolution)
        bucket_counts[f"{bw}x{bh}"] += 1
        if max(bw / f.width, bh / f.height) > 1.0:  # the trainer scales it up to cover the bucket
            below[f"{bw}x{bh}"] += 1
    stats.resolutions = by_size(sizes)
    stats.buckets = by_size(bucket_counts)
    stats.below = dict(below)
    for lo, hi in CAPTION_LENGTH_BINS:
        stats.caption_length_bins[_bin_label(lo, hi)] = sum(1 for n in stats.caption_words if lo <= n <= hi)
    return stats
