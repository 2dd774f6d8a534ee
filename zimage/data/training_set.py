"""A dataset folder turned into training items: usable images, their buckets and captions.

Unreadable, truncated, empty, non-image or too-small files are skipped and reported by name, never
fatal. The batch order is a pure function of (seed, epoch), and `BucketBatchSampler.state_dict()`
holds where in it a run is, so a resumed run continues with the same batches.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zimage.data.buckets import bucket_for, fit_to_bucket, make_buckets
from zimage.data.cache import FeatureCache, file_sha256
from zimage.data.captions import build_caption
from zimage.data.folders import DatasetFolder, DatasetInfo
from zimage.data.images import ImageProblem, open_rgb


@dataclass(frozen=True)
class TrainingItem:
    image: Path
    sha256: str  # image bytes
    size: tuple[int, int]  # after EXIF orientation
    bucket: tuple[int, int]  # (width, height) it trains at
    caption: str  # final caption (prefix/suffix and trigger applied)
    caption_missing: bool = False

    @property
    def name(self) -> str:
        return self.image.name


@dataclass(frozen=True)
class SkippedFile:
    name: str
    reason: str


@dataclass
class TrainingSet:
    info: DatasetInfo
    items: list[TrainingItem]
    skipped: list[SkippedFile] = field(default_factory=list)

    @property
    def content_hash(self) -> str:
        """Identity of what was trained on: every used image's bytes and final caption."""
        h = hashlib.sha256()
        for item in sorted(self.items, key=lambda i: i.name):
            h.update(f"{item.name}\0{item.sha256}\0{item.caption}\n".encode())
        return h.hexdigest()

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        counts: dict[tuple[int, int], int] = {}
        for item in self.items:
            counts[item.bucket] = counts.get(item.bucket, 0) + 1
        return counts


def _image_size(path: Path, sha: str, cache: FeatureCache | None) -> tuple[int, int]:
    """Decoded size after EXIF orientation; a file that decoded before (same bytes) is not decoded again."""
    if cache is not None:
        size = cache.load_probe(sha)
        if size is not None:
            return size
    size = open_rgb(path).size
    if cache is not None:
        cache.save_probe(sha, size)
    return size


def scan_dataset(
    folder: Path,
    resolution: int,
    trigger_word: str | None = None,
    min_side: int = 0,
    cache: FeatureCache | None = None,
) -> TrainingSet:
    """Every image of `folder` with its bucket and caption; bad files land in `skipped` with the reason."""
    dataset = DatasetFolder(folder)
    info = dataset.read_info()
    trigger = info.trigger_word if trigger_word is None else trigger_word
    buckets = make_buckets(resolution)
    items: list[TrainingItem] = []
    skipped: list[SkippedFile] = []
    for entry in dataset.items():
        try:
            sha = file_sha256(entry.image)
            width, height = _image_size(entry.image, sha, cache)
        except ImageProblem as exc:
            skipped.append(SkippedFile(entry.image.name, str(exc).split(": ", 1)[-1]))
            continue
        except OSError as exc:
            skipped.append(SkippedFile(entry.image.name, f"cannot be read ({exc.strerror or exc})"))
            continue
        if min(width, height) < min_side:
            skipped.append(SkippedFile(entry.image.name, f"{width}x{height} is smaller than {min_side} px on a side"))
            continue
        raw = entry.caption
        items.append(
            TrainingItem(
                image=entry.image,
                sha256=sha,
                size=(width, height),
                bucket=bucket_for(width, height, buckets),
                caption=build_caption(raw, trigger, info.caption_prefix, info.caption_suffix),
                caption_missing=raw is None,
            )
        )
    return TrainingSet(info=info, items=items, skipped=skipped)


def load_pixels(item: TrainingItem) -> torch.Tensor:
    """(3, H, W) float tensor in [-1, 1] at the item's bucket size, ready for the VAE."""
    img = fit_to_bucket(open_rgb(item.image), item.bucket)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return arr.permute(2, 0, 1).div_(127.5).sub_(1.0)


class BucketBatchSampler:
    """Batches of item indices that share a bucket, reshuffled each epoch from (seed, epoch).

    With several processes each takes every world_size-th batch of the same order (data parallel).
    """

    def __init__(self, buckets: list[tuple[int, int]], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out (on this rank)
        self._order: list[list[int]] | None = None

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(index)
        batches: list[list[int]] = []
        for bucket in sorted(groups):
            members = groups[bucket]
            rng.shuffle(members)
            batches += [members[i : i + self.batch_size] for i in range(0, len(members), self.batch_size)]
        rng.shuffle(batches)
        # Every rank needs the same number of batches per epoch: repeat from the start to fill up.
        while len(batches) % self.world_size:
            batches.append(batches[len(batches) % max(1, len(batches))])
        return batches[self.rank :: self.world_size]

    def next_batch(self) -> list[int]:
        if self._order is None:
            self._order = self._epoch_batches(self.epoch)
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_batches(self.epoch)
        batch = self._order[self.position]
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = None
