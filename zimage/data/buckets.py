"""Aspect-ratio buckets: sizes near a target pixel area with both sides multiples of 16.

Each image goes to the bucket whose aspect ratio is closest to its own (in log space, so 2:1 and 1:2
are equally far from square), is scaled to cover it and centre-cropped, so little of it is lost.
"""

from __future__ import annotations

import math

from PIL import Image

BUCKET_STEP = 16  # VAE factor 8 x transformer patch 2 (DESIGN.md section 4)


def make_buckets(resolution: int, step: int = BUCKET_STEP, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """(width, height) pairs with width * height <= resolution², sides multiples of `step`, ratio <= max_ratio."""
    area = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    width = step
    while width <= area // step:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
        width += step
    # Among buckets with (almost) the same ratio keep the largest: the ratio, not the rounding, picks one.
    best: dict[float, tuple[int, int]] = {}
    for w, h in buckets:
        key = round(math.log(w / h), 2)
        if key not in best or w * h > best[key][0] * best[key][1]:
            best[key] = (w, h)
    return sorted(best.values())


def bucket_for(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width:height."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Scale `img` so it covers the bucket, then centre-crop to exactly the bucket size."""
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    new_w, new_h = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - bw) // 2, (new_h - bh) // 2
    return img.crop((left, top, left + bw, top + bh))
