"""The value limits of a TrainingConfig: every number finite and inside what the code below it accepts.

`value_problems(config)` checks the fields that need nothing but the config (ranges, finiteness, control
characters, names); `output_root_problem` keeps output_dir inside ZIMAGE_HOME or an admin's allowed root;
validate.py calls both before anything is created (the memory fit check lives in
zimage.training.memory_fit: the training room imports config, not the other way round). Each limit carries the reason it exists, which the error message repeats.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from dataclasses import fields
from pathlib import Path

from zimage.config.schema import ConfigProblem, TrainingConfig
from zimage.data.images import MAX_PIXELS
from zimage.settings import Settings, SettingsFileError

SEED_MAX = 2**32 - 1  # accelerate's set_seed seeds numpy, whose seeds are 0 .. 2**32 - 1
MAX_STEPS = 999_999  # checkpoint folders are step-NNNNNN: six digits keep them in step order
MIN_RESOLUTION, MAX_RESOLUTION = 256, 4096
MAX_LORA_RANK = 3840  # the transformer's width (DESIGN.md section 4): a higher rank adds no capacity
# output_name becomes a file name: matched against the whole string (re.fullmatch; `$` would let "a\n" in)
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

# field -> (lowest, highest, multiple of, why); None fields (follow the model) are not checked.
INT_LIMITS: dict[str, tuple[int, int, int, str]] = {
    "seed": (0, SEED_MAX, 1, "numpy seeds are 0 to 2**32 - 1"),
    "sample_seed": (0, SEED_MAX, 1, "seeds are 0 to 2**32 - 1"),
    "num_steps": (1, MAX_STEPS, 1, "checkpoint names hold six digits"),
    "lr_warmup_steps": (0, MAX_STEPS, 1, "at most the longest run"),
    "save_every_n_steps": (0, MAX_STEPS, 1, "0 turns checkpoints off"),
    "sample_every_n_steps": (0, MAX_STEPS, 1, "0 turns samples off"),
    "validation_every_n_steps": (0, MAX_STEPS, 1, "0: the validation loss only at the end"),
    "log_every_n_steps": (1, MAX_STEPS, 1, "at most the longest run"),
    "keep_last_n_checkpoints": (0, 1000, 1, "0 keeps every checkpoint"),
    "lora_rank": (1, MAX_LORA_RANK, 1, "the transformer is 3840 wide; a higher rank adds nothing"),
    "batch_size": (1, 1024, 1, "one batch is one aspect bucket held in memory at once"),
    "gradient_accumulation": (1, 1024, 1, "micro-batches per optimizer step"),
    "resolution": (MIN_RESOLUTION, MAX_RESOLUTION, 16, "image sides are multiples of 16: VAE 8 x patch 2"),
    "sample_resolution": (64, MAX_RESOLUTION, 16, "image sides are multiples of 16; or null: the training one"),
    "min_image_side": (8, math.isqrt(MAX_PIXELS), 1, "a larger side breaks the image pixel limit; or null"),
    "sample_steps": (1, 1000, 1, "the scheduler has 1000 timesteps; or null: the model's default"),
}

# field -> (lowest, lowest allowed?, highest, highest allowed?, why); every float must also be finite.
FLOAT_LIMITS: dict[str, tuple[float, bool, float, bool, str]] = {
    "learning_rate": (0.0, False, 3.4e38, True, "a step the fp32 weights can hold; float32 ends near 3.4e38"),
    "caption_dropout": (0.0, True, 1.0, True, "a probability"),
    "lora_alpha": (0.0, False, 1e6, True, "the LoRA is scaled by alpha / rank"),
    "lora_dropout": (0.0, True, 1.0, False, "a probability below 1"),
    "weight_decay": (0.0, True, 10.0, True, "decoupled decay per step"),
    "max_grad_norm": (0.0, True, 1e6, True, "0: no clipping"),
    "timestep_shift": (0.0, False, 1000.0, True, "or null: the model's scheduler shift"),
    "logit_mean": (-10.0, True, 10.0, True, "the mean of the logit-normal timestep density"),
    "logit_std": (0.0, False, 10.0, True, "the spread of the logit-normal timestep density"),
    "sample_cfg": (1.0, True, 30.0, True, "1.0 = no CFG; or null: the model's default"),
    "preservation_weight": (0.0, True, 1e6, True, "0 turns preservation off"),
}


def _range_text(lo: float, lo_in: bool, hi: float, hi_in: bool) -> str:
    return f"{'>=' if lo_in else '>'} {lo:g} and {'<=' if hi_in else '<'} {hi:g}"


def _control_char(text: str) -> str | None:
    """The first control character in `text` (newline, tab, NUL, escape ...), as its escape, or None."""
    for ch in text:
        if unicodedata.category(ch) == "Cc":
            return repr(ch)
    return None


def value_problems(c: TrainingConfig) -> list[ConfigProblem]:
    """Every field outside its limits, non-finite number or string holding a control character."""
    problems: list[ConfigProblem] = []
    for name, (lo, hi, step, why) in INT_LIMITS.items():
        value = getattr(c, name)
        if value is None:
            continue
        if not lo <= value <= hi or value % step:
            what = f"a multiple of {step} from {lo} to {hi}" if step > 1 else f"an integer >= {lo} and <= {hi}"
            problems.append(ConfigProblem(name, value, f"must be {what} ({why})"))
    for name, (lo, lo_in, hi, hi_in, why) in FLOAT_LIMITS.items():
        value = getattr(c, name)
        if value is None:
            continue
        if not math.isfinite(value):
            problems.append(ConfigProblem(name, value, f"must be a finite number {_range_text(lo, lo_in, hi, hi_in)}"))
        elif not ((lo <= value) if lo_in else (lo < value)) or not ((value <= hi) if hi_in else (value < hi)):
            problems.append(ConfigProblem(name, value, f"must be {_range_text(lo, lo_in, hi, hi_in)} ({why})"))
    for f in fields(TrainingConfig):
        value = getattr(c, f.name)
        texts = value if isinstance(value, list) else [value]
        for text in texts:
            bad = _control_char(text) if isinstance(text, str) else None
            if bad:
                problems.append(ConfigProblem(f.name, value, f"must not hold control characters (found {bad})"))
                break
    return problems


def allowed_output_roots(settings: Settings) -> list[Path]:
    """ZIMAGE_HOME plus the admin's `[paths] allowed_output_roots` from settings.toml, symlinks resolved."""
    roots = [settings.home, *(Path(p) for p in settings.home_settings().paths.allowed_output_roots)]
    return [Path(os.path.realpath(r.expanduser())) for r in roots]


def output_root_problem(folder: Path, settings: Settings) -> str | None:
    """Why `folder` may not receive outputs (outside every allowed root), or None when it may.

    realpath first: `..` and symlinks must not lead a relative output_dir out of the home.
    """
    real = Path(os.path.realpath(folder))
    try:
        roots = allowed_output_roots(settings)
    except SettingsFileError as exc:
        return f"{real} is outside ZIMAGE_HOME and the allowed roots cannot be read ({exc})"
    if any(real == root or real.is_relative_to(root) for root in roots):
        return None
    listed = ", ".join(str(r) for r in roots)
    return (
        f"{real} is outside the allowed output roots ({listed}); use a folder under ZIMAGE_HOME, or ask an "
        f"admin to add its root to [paths] allowed_output_roots in {settings.settings_path}"
    )
