"""Open any image a user might drop in and return clean RGB pixels, or say exactly why not.

Handles EXIF orientation, transparency (composited onto white), palette, CMYK, 16-bit and grayscale
images. Everything that goes wrong is an ImageProblem whose message names the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from zimage.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Anything above this many pixels is treated as a decompression bomb (about 16k x 16k).
MAX_PIXELS = 256_000_000


class ImageProblem(UserError):
    """An image that cannot be used; the message names the file and the reason."""


def is_image_name(path: Path | str) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit integer grayscale: scale to 8 bit instead of clipping everything above 255 to white.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / top * 255.0).clip(0, 255).astype("uint8"), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, F ...
    return img


def open_rgb(path: Path | str, min_side: int = 0) -> Image.Image:
    """Decode `path` fully, apply EXIF orientation and return an RGB image.

    Raises ImageProblem for empty, unreadable, truncated, oversized or too-small files.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageProblem(f"{path.name}: cannot be read ({exc.strerror or exc})") from exc
    if size == 0:
        raise ImageProblem(f"{path.name}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageProblem(f"{path.name}: {w}x{h} pixels is over the limit of {MAX_PIXELS:,} pixels")
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = _to_rgb(img)
    except ImageProblem:
        raise
    except UnidentifiedImageError as exc:
        raise ImageProblem(f"{path.name}: not an image PIL can decode") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem(f"{path.name}: too many pixels (decompression bomb guard)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageProblem(f"{path.name}: damaged or truncated image ({exc})") from exc
    if min(rgb.size) < min_side:
        raise ImageProblem(f"{path.name}: {rgb.size[0]}x{rgb.size[1]} is smaller than {min_side} px on a side")
    return rgb


# -- perceptual fingerprints (near-duplicate images) ---------------------------------------------
FINGERPRINT_BITS = 192  # a 64-bit difference hash per colour channel


def fingerprint(rgb: Image.Image) -> tuple[int, bytes]:
    """(difference hash, 8x8 colour thumbnail) of an RGB image: the same picture resized, re-encoded or
    slightly retouched gives (almost) the same pair. The hash (per channel: is each pixel of a 9x8
    shrink brighter than its right neighbour) sees the structure; the thumbnail tells apart images whose
    structure is the same, such as two flat colours."""
    small = rgb.resize((9, 8), Image.Resampling.BOX)
    bits = 0
    for channel in small.split():
        px = list(channel.getdata())
        for row in range(8):
            for col in range(8):
                bits = (bits << 1) | (px[row * 9 + col] > px[row * 9 + col + 1])
    return bits, rgb.resize((8, 8), Image.Resampling.BOX).tobytes()


def fingerprint_distance(a: tuple[int, bytes], b: tuple[int, bytes]) -> tuple[int, float]:
    """(differing hash bits, mean absolute thumbnail difference in 0-255 levels)."""
    return (a[0] ^ b[0]).bit_count(), sum(abs(x - y) for x, y in zip(a[1], b[1], strict=True)) / len(a[1])
