"""The validation report a person reads before training: problems per image, each with its fix.

Images are decoded the way the trainer decodes them (`open_rgb`), so a file that would break training
shows up here first. Errors are files training cannot use; warnings are files that will train badly:
below the training size, extreme aspect ratios, duplicates (same bytes, or the same picture resized or
re-encoded: a perceptual fingerprint), captions that are missing, empty, very short, lack the trigger
word, or run past what the text encoder reads (counted with the model's own tokenizer when one is given).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from zimage.data.captions import TRIGGER_PLACEHOLDER, build_caption
from zimage.data.folders import DatasetFolder, DatasetInfo
from zimage.data.images import ImageProblem, fingerprint, fingerprint_distance, is_image_name, open_rgb
from zimage.data.manage import image_hashes, image_root
from zimage.data.stats import bucket_at

MIN_SIDE = 64  # below this an image is useless at any resolution
MAX_UPSCALE = 2.0  # more upscaling than this to reach the bucket gives soft, blurry training targets
MAX_ASPECT = 3.0  # beyond 3:1 the bucket squeezes or crops away most of the subject
MIN_CAPTION_WORDS = 3  # fewer words teach the model little beyond the trigger word
TEXT_TOKEN_LIMIT = 512  # zimage.training.zimage_math.MAX_TEXT_TOKENS (that module imports torch); a test ties them
# Two images are the same picture when their fingerprints differ in at most this many of 192 hash bits and
# their 8x8 colour thumbnails by at most this many levels on average. Measured: a 3/4 resize saved as JPEG q70
# is (3 bits, 0.2 levels) from its original; the closest two distinct demo shapes are (8 bits, 33 levels).
DUPLICATE_BITS, DUPLICATE_LEVELS = 10, 8.0


@dataclass
class Problem:
    image: str
    level: str  # "error": training cannot use it | "warning": it will train badly
    kind: str  # unreadable, too_small, low_resolution, below_resolution, extreme_aspect, duplicate,
    # missing_caption, empty_caption, short_caption, missing_trigger, too_many_tokens, orphan_caption,
    # empty_dataset
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
    elif upscale > 1.0:
        out.append(
            Problem(
                name,
                "warning",
                "below_resolution",
                f"{w}x{h} is below its training bucket {bw}x{bh} at resolution {resolution}: upscaled {upscale:.2f}x",
                "A larger original trains sharper; a slight upscale like this one is usually fine.",
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


def _caption_problems(name: str, caption: str | None, info: DatasetInfo) -> list[Problem]:
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
    out = []
    words = len(caption.split())
    if words < MIN_CAPTION_WORDS:
        out.append(
            Problem(
                name,
                "warning",
                "short_caption",
                f"its caption {caption!r} has {words} word(s); under {MIN_CAPTION_WORDS} teaches little",
                "Describe what is in the picture besides the subject (setting, pose, light), or run Captioning.",
            )  # fmt: skip
        )
    trigger = info.trigger_word.strip()
    joined = " ".join([info.caption_prefix, caption, info.caption_suffix])
    if trigger and TRIGGER_PLACEHOLDER not in joined and trigger.lower() not in joined.lower():
        out.append(
            Problem(
                name,
                "warning",
                "missing_trigger",
                f"its caption lacks the trigger word {trigger!r}; training puts it in front, so it is not where "
                "the caption would say it",
                f"Add {trigger!r} (or {TRIGGER_PLACEHOLDER}) where it belongs, e.g. with a bulk-edit prefix.",
            )  # fmt: skip
        )
    return out


def token_counter(model_dir: Path):
    """A function caption -> tokens the text encoder of the pipeline folder reads, counted as the trainer
    tokenizes (the tokenizer's chat template around the caption), and the encoder's limit."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(model_dir) / "tokenizer")

    def count(caption: str) -> int:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        return len(tokenizer(text).input_ids)

    return count, TEXT_TOKEN_LIMIT


def _token_problem(name: str, caption: str | None, info: DatasetInfo, counter) -> list[Problem]:
    if counter is None or caption is None or not caption.strip():
        return []
    count, limit = counter
    tokens = count(build_caption(caption, info.trigger_word, info.caption_prefix, info.caption_suffix))
    if tokens <= limit:
        return []
    return [
        Problem(
            name,
            "warning",
            "too_many_tokens",
            f"its caption is {tokens} tokens for the text encoder, which reads {limit}: the end is cut off",
            "Shorten the caption (Captioning's 'short' detail level, or edit it by hand).",
        )  # fmt: skip
    ]


def _duplicate_of(name: str, digest: str | None, print_: tuple | None, seen: dict, seen_prints: list) -> Problem | None:
    """The duplicate problem of `name` against the images before it (same bytes, else the same picture)."""
    if digest and digest in seen:
        return Problem(
            name, "warning", "duplicate", f"same content as {seen[digest]}",
            "Delete one of the two; duplicates are trained twice as often.",
        )  # fmt: skip
    if digest:
        seen[digest] = name
    if print_ is None:
        return None
    for other, other_print in seen_prints:
        bits, levels = fingerprint_distance(print_, other_print)
        if bits <= DUPLICATE_BITS and levels <= DUPLICATE_LEVELS:
            return Problem(
                name, "warning", "duplicate", f"looks the same as {other} (a resized or re-encoded copy)",
                "Delete one of the two; duplicates are trained twice as often.",
            )  # fmt: skip
    seen_prints.append((name, print_))
    return None


def validate_dataset(folder: DatasetFolder, model_dir: Path | None = None) -> list[Problem]:
    """Every problem of every image (decoded fully), in dataset order; an empty list means ready.
    With `model_dir` (a base-model pipeline folder) captions are also counted with its tokenizer."""
    info = folder.read_info()
    items = folder.items()
    if not items:
        return [Problem("(dataset)", "error", "empty_dataset", "the dataset has no images", "Upload images first.")]
    counter = token_counter(model_dir) if model_dir is not None else None
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    seen_prints: list = []
    hashes = image_hashes(folder)
    for item in items:
        name, print_ = item.image.name, None
        try:
            rgb = open_rgb(item.image)
        except ImageProblem as exc:
            problems.append(
                Problem(
                    name, "error", "unreadable", str(exc).split(": ", 1)[-1], "Delete it and upload a working copy."
                )  # fmt: skip
            )
        else:
            problems += _size_problems(name, *rgb.size, info.resolution)
            print_ = fingerprint(rgb)
        if duplicate := _duplicate_of(name, hashes.get(name), print_, seen, seen_prints):
            problems.append(duplicate)
        caption = item.caption
        problems += _caption_problems(name, caption, info)
        problems += _token_problem(name, caption, info, counter)
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


def dataset_version(folder: DatasetFolder) -> tuple:
    """What the report depends on, read from file stats only: changes with any upload, delete or edit."""
    root = image_root(folder)
    files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    marks = [(p.name, st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]]
    info = folder.info_path.stat().st_mtime_ns if folder.info_path.exists() else 0
    return (info, tuple(marks))


@lru_cache(maxsize=16)
def _cached(path: str, version: tuple, model_dir: str | None) -> tuple[Problem, ...]:
    return tuple(validate_dataset(DatasetFolder(Path(path)), Path(model_dir) if model_dir else None))


def current_report(folder: DatasetFolder, model_dir: Path | None = None) -> list[Problem]:
    """validate_dataset, recomputed only when the dataset changed (an upload, a delete, a caption edit), so a
    page can show a fresh report on every run without decoding every image again."""
    return list(_cached(str(folder.path), dataset_version(folder), str(model_dir) if model_dir else None))
