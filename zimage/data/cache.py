"""On-disk caches of VAE latents, text embeddings and image probes, keyed by content.

A key hashes everything that changes the cached value: the model component's fingerprint (its config
and weights, not its path), the image bytes or caption text, the bucket, the dtype and a format
version. So a second run on the same data finds everything, a changed caption misses only its own
entry, and two datasets sharing an image share its latent. Entries are single safetensors files
written atomically (temp file + rename): a killed run never leaves a half entry behind.

    <cache_dir>/latents/ab/ab12....safetensors   {"latent": (16, H/8, W/8)}
    <cache_dir>/text/cd/cd34....safetensors      {"embedding": (tokens, hidden)}
    <cache_dir>/probe/ef/ef56....json            {"width": w, "height": h} after EXIF orientation
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zimage.fsio import atomic_path, write_json

CACHE_FORMAT = 1  # bump when what is stored changes meaning
_EDGE = 64 * 1024  # bytes hashed from each end of a weight file


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def component_fingerprint(folder: Path) -> str:
    """A cheap identity for a model component folder (vae/, text_encoder/, tokenizer/).

    Config files and small files are hashed whole; big weight files by size plus their first and last
    64 KiB (the safetensors header names every tensor and offset, the tail catches a retrained file).
    Independent of where the folder lives, so a copied model keeps its cache.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and ".cache" not in p.parts):
        h.update(path.relative_to(folder).as_posix().encode())
        size = path.stat().st_size
        h.update(str(size).encode())
        with open(path, "rb") as fh:
            if size <= 4 * _EDGE:
                h.update(fh.read())
            else:
                h.update(fh.read(_EDGE))
                fh.seek(size - _EDGE)
                h.update(fh.read(_EDGE))
    return h.hexdigest()


def make_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_FORMAT, *parts], default=str).encode()).hexdigest()


def latent_key(vae_fingerprint: str, image_sha256: str, bucket: tuple[int, int], dtype: str) -> str:
    return make_key("latent", vae_fingerprint, image_sha256, list(bucket), dtype)


def text_key(encoder_fingerprint: str, caption: str, max_length: int, dtype: str) -> str:
    return make_key("text", encoder_fingerprint, caption, max_length, dtype)


@dataclass
class CacheStats:
    """What a run found and what it had to compute (the second run on the same data encodes nothing)."""

    latents_hit: int = 0
    latents_encoded: int = 0
    text_hit: int = 0
    text_encoded: int = 0
    vae_loaded: bool = False
    text_encoder_loaded: bool = False


class FeatureCache:
    """One cache folder; safe for several processes (atomic writes, identical content per key)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / key[:2] / f"{key}{suffix}"

    def has(self, kind: str, key: str) -> bool:
        return self._path(kind, key, ".safetensors").is_file()

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(kind, key, ".safetensors")
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except Exception:  # a damaged entry is a miss; it is rewritten on the next save
            return None

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        path = self._path(kind, key, ".safetensors")
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        return path

    def load_probe(self, image_sha256: str) -> tuple[int, int] | None:
        path = self._path("probe", image_sha256, ".json")
        try:
            data = json.loads(path.read_text())
            return int(data["width"]), int(data["height"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save_probe(self, image_sha256: str, size: tuple[int, int]) -> None:
        write_json(self._path("probe", image_sha256, ".json"), {"width": size[0], "height": size[1]})
