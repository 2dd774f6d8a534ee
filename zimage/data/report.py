"""The validation report a person reads before training: problems per image, each with its fix.

Images are decoded the way the trainer decodes them (`open_rgb`), so a file that would break training
shows up here first. Errors are files training cannot use; warnings are files that will train badly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from zimage.data.folders import DatasetFolder
from zimage.data.images import ImageProblem, is_image_name, open_rgb
from zimage.data.manage import image_hashes, image_root
from zimage.data.stats import bucket_at

MIN_SIDE = 64  # below this an image is useless at any resolution
MAX_UPSCALE = 2.0  # more upscaling than this to reach the bucket gives soft, blurry training targets
MAX_ASPECT = 3.0  # beyond 3:1 the bucket squeezes or crops away most of the subject


@dataclass
class Problem:
    image: str
    level: str  # "error": training cannot use it | "warning": it will train badly
    kind: str  # unreadable, too_small, low_resolution, extreme_aspect, missing_caption, empty_caption,
    # duplicate, orphan_caption, empty_dataset (no trigger-word check: training adds a missing one)
    message: str
    fix: str


def _size_problems(name: str, w: int, h: int, resolution: int) -> list[Problem]:
    out = []
    if min(w, h) < MIN_SIDE:
        out.append(
            Problem(
                name,
                "error",
                "too_small",
                f"{w}x{h} is under {MIN_SIDE} px on a side",
                "Delete it and upload a larger version of the picture.",
            )  # fmt: skip
        )
        return out
    bw, bh = bucket_at(w, h, resolution)
    upscale = max(bw / w, bh / h)
    if upscale > MAX_UPSCALE:
        fit = max(64, int(math.sqrt(w * h * MAX_UPSCALE**2)) // 64 * 64)
        out.append(
            Problem(
                name,
                "warning",
                "low_resolution",
                f"{w}x{h} is too small for resolution {resolution}: it is upscaled {upscale:.1f}x to {bw}x{bh}, "
                "so training sees a blurry image",
                f"Upload a larger original, or lower the dataset resolution to {min(fit, resolution)} or less.",
            )  # fmt: skip
        )
    ratio = max(w / h, h / w)
    if ratio > MAX_ASPECT:
        out.append(
            Problem(
                name,
                "warning",
                "extreme_aspect",
                f"aspect ratio {ratio:.1f}:1 is extreme; the bucket {bw}x{bh} crops or squeezes it",
                f"Crop it to at most {MAX_ASPECT:g}:1 around the subject.",
            )  # fmt: skip
        )
    return out


def _caption_problems(name: str, caption: str | None) -> list[Problem]:
    if caption is None:
        return [
            Problem(
                name,
                "warning",
                "missing_caption",
                "has no caption (.txt file)",
                "Write one in the caption editor, or run Captioning with 'only uncaptioned images'.",
            )  # fmt: skip
        ]
    if not caption.strip():
        return [
            Problem(
                name,
                "warning",
                "empty_caption",
                "its caption file is empty",
                "Write a caption in the caption editor or run Captioning with 'overwrite'.",
            )  # fmt: skip
        ]
    return []


def validate_dataset(folder: DatasetFolder) -> list[Problem]:
    """Every problem of every image (decoded fully), in dataset order; an empty list means ready."""
    info = folder.read_info()
    items = folder.items()
    if not items:
        return [Problem("(dataset)", "error", "empty_dataset", "the dataset has no images", "Upload images first.")]
    problems: list[Problem] = []
    first_by_hash: dict[str, str] = {}
    hashes = image_hashes(folder)
    for item in items:
        name = item.image.name
        try:
            w, h = open_rgb(item.image).size
        except ImageProblem as exc:
            problems.append(
                Problem(
                    name, "error", "unreadable", str(exc).split(": ", 1)[-1], "Delete it and upload a working copy."
                )  # fmt: skip
            )
        else:
            problems += _size_problems(name, w, h, info.resolution)
        digest = hashes.get(name)
        if digest in first_by_hash:
            problems.append(
                Problem(
                    name,
                    "warning",
                    "duplicate",
                    f"same content as {first_by_hash[digest]}",
                    "Delete one of the two; duplicates are trained twice as often.",
                )  # fmt: skip
            )
        elif digest:
            first_by_hash[digest] = name
        problems += _caption_problems(name, item.caption)
    images = {i.image.stem for i in items}
    root = image_root(folder)
    for txt in sorted(root.glob("*.txt")):
        if txt.stem not in images and not is_image_name(txt):
            problems.append(
                Problem(
                    txt.name,
                    "warning",
                    "orphan_caption",
                    "caption file without an image of the same name",
                    "Delete it, or upload its image with the same file name.",
                )  # fmt: skip
            )
    return problems


def report_rows(problems: list[Problem]) -> list[dict]:
    return [asdict(p) for p in problems]


def report_summary(problems: list[Problem], images: int) -> str:
    errors = sum(1 for p in problems if p.level == "error")
    warnings = len(problems) - errors
    if not problems:
        return f"All {images} images are ready for training."
    affected = len({p.image for p in problems})
    return f"{errors} error(s) and {warnings} warning(s) in {affected} of {images} images."
