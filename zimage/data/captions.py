"""Training captions: the .txt next to each image, the dataset's prefix/suffix and the trigger word.

Order: prefix + caption + suffix are joined first, then the trigger word replaces every `[trigger]`
in that text, or is prepended when the text has no placeholder and does not already contain it.
"""

from __future__ import annotations

import random

TRIGGER_PLACEHOLDER = "[trigger]"


def _join(parts: list[str]) -> str:
    cleaned = [p.strip().strip(",").strip() for p in parts]
    return ", ".join(p for p in cleaned if p)


def build_caption(raw: str | None, trigger_word: str = "", prefix: str = "", suffix: str = "") -> str:
    """The caption a training sample uses (`raw` is the .txt content, None when there is none)."""
    text = _join([prefix, " ".join((raw or "").split()), suffix])
    trigger = (trigger_word or "").strip()
    if TRIGGER_PLACEHOLDER in text:
        return text.replace(TRIGGER_PLACEHOLDER, trigger).strip().strip(",").strip()
    if trigger and trigger.lower() not in text.lower():
        return _join([trigger, text])
    return text


def drop_caption(caption: str, rng: random.Random, probability: float) -> str:
    """With `probability`, train this sample on the empty caption (keeps the model usable without one)."""
    return "" if probability > 0 and rng.random() < probability else caption
