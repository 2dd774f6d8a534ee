"""The LoRAs page: the library table, one item's details, test-grid and merge forms, delete with a confirm.

Everything the page shows or does goes through zimage.loras (library, merge, hub, mlx); the test grid is
the Compare page's job (zimage.views.compare.queue_testgrid), started with this LoRA at several strengths.
"""

from __future__ import annotations

from typing import Any

from zimage.errors import UserError
from zimage.loras.library import UNKNOWN, LibraryItem, describe, last_samples
from zimage.settings import Settings
from zimage.system import human_bytes
from zimage.views.format import clock


def table_rows(items: list[LibraryItem]) -> list[dict[str, Any]]:
    """One row per LoRA / fine-tune: name, kind, state, size, base, trigger word, rank, run, saved."""
    rows = []
    for item in items:
        rows.append({
            "name": item.name, "kind": item.kind, "state": "damaged" if item.damaged else "ok",
            "size": human_bytes(item.size), "base model": item.field("base_model"),
            "trigger word": item.field("trigger_word"), "rank": item.field("lora_rank").split()[0],
            "run": item.run_id or UNKNOWN, "saved": clock(item.modified),
        })  # fmt: skip
    return rows


def item_key(item: LibraryItem) -> str:
    """The picker's key (and the `?lora=` link): a LoRA and a fine-tune may share a name."""
    return item.name if item.kind == "lora" else f"finetune:{item.name}"


def item_label(item: LibraryItem) -> str:
    state = " (damaged)" if item.damaged else ""
    return f"{item.name}{state}" if item.kind == "lora" else f"{item.name} (fine-tune){state}"


def damaged_lines(items: list[LibraryItem]) -> list[str]:
    return [f"{i.name} ({i.path.name}) is damaged: {i.problem}" for i in items if i.damaged]


def detail_rows(item: LibraryItem) -> list[dict[str, str]]:
    """(field, value) rows of one item's details, "unknown" where the file and its run do not say."""
    return [{"field": k, "value": v} for k, v in describe(item).items() if k != "name"]


def sample_tiles(settings: Settings, item: LibraryItem) -> list[tuple[str, str]]:
    """(thumbnail path, caption) of its run's last samples."""
    from zimage.views.runs import thumbnail

    out = []
    for s in last_samples(item):
        thumb = thumbnail(settings, s["path"])
        if thumb is not None:
            out.append((str(thumb), f"step {s['step']} · {s['prompt']} · seed {s['seed']}"))
    return out


def grid_model(item: LibraryItem) -> str:
    """The model a test grid of this LoRA renders on: its base_model, else the first local model."""
    if item.metadata.get("base_model"):
        return item.metadata["base_model"]
    return ""


def default_prompt(item: LibraryItem) -> str:
    trigger = item.metadata.get("trigger_word")
    config = item.training_config or {}
    return config.get("sample_prompt") or (f"{trigger}, a photo" if trigger else "a photo")


def queue_test(settings: Settings, item: LibraryItem, model: str, prompt: str, strengths: str, seed: int,
               size: int, user: str | None, actor=None) -> str:  # fmt: skip
    """Queue a test grid of this LoRA (one prompt, several strengths); returns the job's run id."""
    from zimage.views.compare import queue_testgrid, testgrid_config

    if item.kind != "lora" or item.damaged:
        raise UserError(f"{item.name}: only a readable LoRA file can be tested with prompts")
    if not model.strip():
        raise UserError("Base model: this LoRA does not say which model it is for; type one (e.g. z-image-turbo)")
    config = testgrid_config(model.strip(), prompt, seed, strengths, {str(item.path): item.name}, size,
                             name=f"test-{item.path.stem}")  # fmt: skip
    return queue_testgrid(settings, config, user, actor=actor)


def parse_weights(text: str, count: int) -> list[float]:
    """'0.8, 0.5' -> [0.8, 0.5], one per chosen LoRA; a UserError names the field."""
    parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"Weights: {text!r} must be numbers separated by commas, e.g. 0.8, 0.5") from None
    if len(values) != count:
        raise UserError(f"Weights: give one weight per chosen LoRA ({count}), e.g. {', '.join(['1.0'] * count)}")
    return values


def merge(settings: Settings, items: list[LibraryItem], weights_text: str, output: str, mode: str,
          rank: int | None = None, actor=None) -> str:  # fmt: skip
    """Merge the chosen LoRAs (mode: exact | svd | model); returns a line saying what was written."""
    from zimage.loras.merge import MergeInput, bake_into_model, merge_loras

    if len(items) < 2:
        raise UserError("Merge: choose at least two LoRAs")
    if not output.strip():
        raise UserError("Output name: give the merged LoRA a name")
    inputs = [MergeInput(i.path, w) for i, w in zip(items, parse_weights(weights_text, len(items)), strict=True)]
    if mode == "model":
        result = bake_into_model(settings, inputs, output.strip(), actor=actor)
        return f"Baked into {result.path} ({result.modules} layers)."
    result = merge_loras(settings, inputs, output.strip(), rank=rank if mode == "svd" else None, actor=actor)
    line = f"Merged into {result.path.name} ({result.modules} layers, rank up to {result.rank})."
    if result.relative_error is not None:
        line += f" Relative error kept: {result.relative_error:.3%}."
    return line
