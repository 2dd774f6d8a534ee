"""Cached gallery thumbnails, kept in the dataset's hidden cache folder.

A thumbnail's file name carries a hash of the image's name and one of its size + modification time,
so a replaced or edited image gets a new thumbnail and only its own stale one is removed.

Grids (the dataset gallery, the sample gallery, the compare grid) show square *tiles*: the whole image
shrunk to fit, letterboxed on a plain background, so every cell has the same shape and no image is ever
stretched or cropped differently from its neighbours.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from PIL import Image, ImageDraw

from zimage.data.folders import DatasetFolder
from zimage.data.images import ImageProblem, open_rgb
from zimage.fsio import atomic_path

THUMB_SIZE = 256
TILE_BACKGROUND = (38, 39, 48)  # the letterbox bars: close to the dark theme's background


def _name_key(image_name: str) -> str:
    return hashlib.sha1(image_name.encode("utf-8")).hexdigest()[:12]


def thumbnails_dir(folder: DatasetFolder) -> Path:
    return folder.cache_dir / "thumbnails"


def thumbnail_path(folder: DatasetFolder, image: Path, size: int = THUMB_SIZE) -> Path:
    st = image.stat()
    version = hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:8]
    return thumbnails_dir(folder) / f"{_name_key(image.name)}-{version}-{size}.jpg"


def drop_thumbnails(folder: DatasetFolder, image_name: str) -> None:
    """Forget every cached thumbnail of one image (all sizes, all versions)."""
    for path in thumbnails_dir(folder).glob(f"{_name_key(image_name)}-*.jpg"):
        path.unlink(missing_ok=True)


def thumbnail(folder: DatasetFolder, image: Path, size: int = THUMB_SIZE, tile: bool = False) -> Path | None:
    """Path of a JPEG thumbnail (longest side `size`; with `tile` a letterboxed size x size square) of `image`,
    made once; None if it cannot be decoded."""
    image = Path(image)
    target = thumbnail_path(folder, image, size)
    if tile:
        target = target.with_name(target.stem + "-tile.jpg")
    if target.exists():
        return target
    for old in thumbnails_dir(folder).glob(f"{_name_key(image.name)}-*.jpg"):  # older versions of this image
        if old.name.split("-")[1] != target.name.split("-")[1]:
            old.unlink(missing_ok=True)
    return write_thumbnail(image, target, size, tile=tile)


def letterbox(rgb: Image.Image, size: int = THUMB_SIZE, background=TILE_BACKGROUND) -> Image.Image:
    """The whole image shrunk (never enlarged, never stretched) to fit a square, centred on `background`; the
    square's side is `size`, or the image's longer side when that is smaller."""
    side = min(size, max(rgb.size))
    rgb = rgb.copy()
    rgb.thumbnail((side, side), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (side, side), background)
    tile.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return tile


def write_thumbnail(
    image: Path, target: Path, size: int = THUMB_SIZE, quality: int = 85, tile: bool = False
) -> Path | None:
    """Decode `image`, shrink it to `size` on its longest side (with `tile`: letterboxed into a square)
    and write a JPEG atomically to `target`.

    None if the image cannot be decoded (the caller shows a placeholder).
    """
    try:
        rgb = open_rgb(image)
    except ImageProblem:
        return None
    if tile:
        rgb = letterbox(rgb, size)
    else:
        rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
    with atomic_path(target, fsync=False) as tmp:  # a thumbnail is rebuilt if lost: no fsync
        rgb.save(tmp, format="JPEG", quality=quality)
    return target


def placeholder(size: int = THUMB_SIZE, text: str = "unreadable") -> Image.Image:
    """A grey tile with a cross, shown in place of an image that cannot be decoded."""
    img = Image.new("RGB", (size, size), (90, 90, 90))
    draw = ImageDraw.Draw(img)
    draw.line([(0, 0), (size, size)], fill=(160, 60, 60), width=4)
    draw.line([(0, size), (size, 0)], fill=(160, 60, 60), width=4)
    draw.text((8, 8), text, fill=(240, 240, 240))
    return img


def gallery(folder: DatasetFolder, size: int = THUMB_SIZE) -> list[tuple[str, str | Image.Image]]:
    """(image name, thumbnail path or placeholder image) for every image, in dataset order."""
    return gallery_page(folder, 1, per_page=max(1, len(folder.items())), size=size)[0]


def gallery_page(
    folder: DatasetFolder, page: int, per_page: int = 24, size: int = THUMB_SIZE
) -> tuple[list[tuple[str, str | Image.Image]], int]:
    """One page of the gallery (1-based `page`, clamped) and the number of pages."""
    items = folder.items()
    pages = max(1, -(-len(items) // per_page))
    page = min(max(1, int(page)), pages)
    out: list[tuple[str, str | Image.Image]] = []
    for item in items[(page - 1) * per_page : page * per_page]:
        thumb = thumbnail(folder, item.image, size, tile=True)
        out.append((item.image.name, str(thumb) if thumb else placeholder(size)))
    return out, pages


def picked_image(names: list[str], clicked: int | None, last_clicked: int | None, current: str | None) -> str | None:
    """Which image the editor shows: a click in the gallery wins, else the current choice if it is still
    there, else the first image. The image-select component returns its last value on every rerun (its
    default before any click), so only a change from the value it had on the previous run is a click."""
    if clicked is not None and last_clicked is not None and clicked != last_clicked and 0 <= clicked < len(names):
        return names[clicked]
    if current in names:
        return current
    return names[0] if names else None
