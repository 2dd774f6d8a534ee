"""The LoRAs library: every LoRA file and fine-tune under a home's models/, trained here or copied in.

    models/loras/**/<name>.safetensors     LoRA files (trained/ is where runs write; anything else is kept too)
    models/finetuned/<name>/transformer/   full fine-tunes (finetune.py), with zimage_finetune.json beside

Only the safetensors header is read for a listing (metadata, key names, shapes), never the weights, so a
folder of big files lists fast. A file that is not readable safetensors, or holds no LoRA weights, is
listed as damaged with the reason; metadata fields a file does not carry show as "unknown". The run a
file came from is found by the output_path its run recorded in status.json (read through the typed
reader), which gives its owner, the run link and its last samples.

Names: a LoRA is named by its path under models/loras/ without the suffix, `trained/` left out (so a
trained LoRA is just its output name, a merged one `merged/<name>`); a fine-tune by its folder name.
Deleting goes through `delete_item`, which takes the acting user (issue 18 checks owner or admin there).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zimage.errors import UserError
from zimage.settings import Settings

UNKNOWN = "unknown"
LORA_KEY_ENDINGS = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight")
TEXT_ENCODER_SUFFIX = ".text_encoder.safetensors"  # text_lora.text_encoder_lora_path: shown with its LoRA
FINETUNE_METADATA = "zimage_finetune.json"  # finetune.METADATA_FILE (not imported: that module needs torch)
# What the page and `loras show` list, in order: (label, metadata key)
SHOWN_FIELDS = (
    ("base model", "base_model"),
    ("model type", "base_model_type"),
    ("trigger word", "trigger_word"),
    ("rank", "lora_rank"),
    ("alpha", "lora_alpha"),
    ("steps", "steps"),
    ("resolution", "resolution"),
    ("dataset", "dataset_name"),
    ("dataset hash", "dataset_hash"),
    ("images", "num_images"),
    ("val_loss", "val_loss"),
    ("created", "created"),
    ("software", "software_version"),
)


@dataclass
class LibraryItem:
    """One LoRA file or fine-tune folder, as far as its header and its run say."""

    name: str
    kind: str  # "lora" | "finetune"
    path: Path
    size: int
    modified: float
    metadata: dict[str, str] = field(default_factory=dict)
    problem: str | None = None  # why the file is damaged (None: it reads)
    modules: int = 0  # adapted layers (LoRA) or tensors (fine-tune)
    inferred_rank: int | None = None  # from the weights' shapes, when the metadata has no rank
    run_id: str | None = None
    run_dir: Path | None = None
    owner: str | None = None  # the user of the run that wrote it (None: copied in, or unknown)
    extras: list[Path] = field(default_factory=list)  # files that belong to it (the text encoder LoRA)

    @property
    def damaged(self) -> bool:
        return self.problem is not None

    def field(self, key: str) -> str:
        """A metadata value for people: the value, or "unknown"."""
        value = self.metadata.get(key)
        if key == "lora_rank" and not value and self.inferred_rank is not None:
            return f"{self.inferred_rank} (from the weights)"
        return value if value not in (None, "") else UNKNOWN

    def fields(self) -> dict[str, str]:
        return {label: self.field(key) for label, key in SHOWN_FIELDS}

    @property
    def training_config(self) -> dict[str, Any] | None:
        """The training config the file carries (JSON in the metadata), or None."""
        raw = self.metadata.get("training_config")
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            return None
        return value if isinstance(value, dict) else None


# -- reading ------------------------------------------------------------------------------------------
def read_header(path: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """(metadata, {key: shape}) of a safetensors file, from its header only; a UserError says why not."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            metadata = dict(fh.metadata() or {})
            shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for every kind of bad header
        raise UserError(f"{path.name}: not a readable safetensors file ({exc})") from None
    metadata.pop("format", None)
    return metadata, shapes


def _lora_item(settings: Settings, path: Path) -> LibraryItem:
    root = settings.models_dir / "loras"
    rel = path.relative_to(root).with_suffix("")
    name = str(rel.relative_to("trained")) if rel.parts[0] == "trained" and len(rel.parts) > 1 else str(rel)
    st = path.stat()
    item = LibraryItem(name=name, kind="lora", path=path, size=st.st_size, modified=st.st_mtime)
    sidecar = path.with_name(path.stem + TEXT_ENCODER_SUFFIX)
    if sidecar.is_file():
        item.extras.append(sidecar)
        item.size += sidecar.stat().st_size
    try:
        item.metadata, shapes = read_header(path)
    except UserError as exc:
        item.problem = str(exc).split(": ", 1)[-1]
        return item
    downs = {k: s for k, s in shapes.items() if k.endswith((".lora_A.weight", ".lora_down.weight"))}
    if not any(k.endswith(LORA_KEY_ENDINGS) for k in shapes):
        item.problem = "holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys)"
    item.modules = len(downs)
    ranks = {s[0] for s in downs.values() if s}
    if len(ranks) == 1:
        item.inferred_rank = ranks.pop()
    return item


def _finetune_item(folder: Path) -> LibraryItem:
    files = [p for p in folder.rglob("*") if p.is_file()]
    item = LibraryItem(name=folder.name, kind="finetune", path=folder, size=sum(p.stat().st_size for p in files),
                       modified=folder.stat().st_mtime)  # fmt: skip
    meta = folder / FINETUNE_METADATA
    if meta.is_file():
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
            item.metadata = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            item.problem = f"{FINETUNE_METADATA} cannot be read ({exc})"
    weights = sorted((folder / "transformer").glob("*.safetensors"))
    if not (folder / "transformer" / "config.json").is_file() or not weights:
        item.problem = "no transformer/ folder with config.json and safetensors weights"
        return item
    for w in weights:
        try:
            _meta, shapes = read_header(w)
        except UserError as exc:
            item.problem = str(exc)
            return item
        item.modules += len(shapes)
    return item


def _runs_by_output(settings: Settings) -> dict[Path, tuple[str, Path, str | None]]:
    """{resolved output path: (run id, run folder, user)} from every run's status.json."""
    from zimage.records import Damaged
    from zimage.run_records import read_status

    out: dict[Path, tuple[str, Path, str | None]] = {}
    if not settings.runs_dir.is_dir():
        return out
    for run_dir in sorted(settings.runs_dir.iterdir()):
        status = read_status(run_dir / "status.json")
        if status is None or isinstance(status, Damaged) or not status.output_path:
            continue
        try:
            out[Path(status.output_path).resolve()] = (run_dir.name, run_dir, status.user)
        except (OSError, RuntimeError):
            continue
    return out


def list_items(settings: Settings) -> list[LibraryItem]:
    """Every LoRA and fine-tune in the home, newest first; a damaged one is listed with its problem."""
    items: list[LibraryItem] = []
    root = settings.models_dir / "loras"
    if root.is_dir():
        for path in sorted(root.rglob("*.safetensors")):
            if any(p.startswith(".") for p in path.relative_to(root).parts) or path.name.endswith(TEXT_ENCODER_SUFFIX):
                continue  # a temp file of an atomic write, or the text encoder part of a LoRA beside it
            if path.is_file():
                items.append(_lora_item(settings, path))
    if settings.finetuned_dir.is_dir():
        for folder in sorted(settings.finetuned_dir.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                items.append(_finetune_item(folder))
    runs = _runs_by_output(settings)
    for item in items:
        found = runs.get(item.path.resolve())
        if found:
            item.run_id, item.run_dir, item.owner = found
    items.sort(key=lambda i: i.modified, reverse=True)
    return items


def get_item(settings: Settings, name: str, kind: str | None = None) -> LibraryItem:
    """The item called `name` (a LoRA's name, its file name, or a fine-tune's folder); UserError if none."""
    wanted = name.removesuffix(".safetensors")
    items = [i for i in list_items(settings) if kind is None or i.kind == kind]
    for item in items:
        if item.name == wanted:
            return item
    by_stem = [i for i in items if i.kind == "lora" and i.path.stem == Path(wanted).name]
    if len(by_stem) == 1:
        return by_stem[0]
    what = {"lora": "LoRA", "finetune": "fine-tune"}.get(kind or "", "LoRA or fine-tune")
    known = ", ".join(i.name for i in items[:10]) or "none yet"
    raise UserError(f"{name}: no {what} of that name in {settings.models_dir} (known: {known})")


def last_samples(item: LibraryItem, limit: int = 8) -> list[dict[str, Any]]:
    """The sample images of the item's run at its last sampled step: path, prompt, seed, step."""
    from zimage.records import Damaged
    from zimage.run_records import parse_sample_line

    if item.run_dir is None or not (item.run_dir / "samples.jsonl").is_file():
        return []
    lines = []
    for raw in (item.run_dir / "samples.jsonl").read_bytes().splitlines():
        line = parse_sample_line(raw)
        if raw.strip() and not isinstance(line, Damaged):
            lines.append(line)
    if not lines:
        return []
    last = max(line.step for line in lines)
    out = []
    for line in lines:
        image = (item.run_dir / line.path).resolve()
        if line.step == last and image.is_file() and image.is_relative_to(item.run_dir.resolve()):
            out.append({"path": image, "prompt": line.prompt or "", "seed": line.seed, "step": line.step})
    return out[:limit]


def run_val_loss(item: LibraryItem) -> float | None:
    """The last val_loss its run logged (metrics.jsonl), when the run logged one."""
    if item.run_dir is None or not (item.run_dir / "metrics.jsonl").is_file():
        return None
    from zimage.records import parse_json

    value = None
    for raw in (item.run_dir / "metrics.jsonl").read_bytes().splitlines():
        if b"val_loss" not in raw:
            continue
        try:
            data = parse_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        v = data.get("val_loss") if isinstance(data, dict) else None
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            value = float(v)
    return value


def describe(item: LibraryItem) -> dict[str, str]:
    """Every field people see for one item, "unknown" where the file and its run do not say."""
    out = {"name": item.name, "kind": item.kind, "path": str(item.path), "size": _size(item.size)}
    out["state"] = f"damaged: {item.problem}" if item.problem else "ok"
    out.update(item.fields())
    if out["val_loss"] == UNKNOWN and (v := run_val_loss(item)) is not None:
        out["val_loss"] = f"{v:.4g} (its run's last)"
    out["run"] = item.run_id or UNKNOWN
    out["owner"] = item.owner or UNKNOWN
    out["layers"] = str(item.modules) if item.kind == "lora" else f"{item.modules} tensors"
    return out


def _size(n: int) -> str:
    from zimage.system import human_bytes

    return human_bytes(n)


# -- deleting -----------------------------------------------------------------------------------------
def acting_checked(settings: Settings, user: str | None, verb: str, item: LibraryItem, actor=None):
    """zimage.auth's check and event record for `verb` on `item` (owner or admin; mode none: anyone named)."""
    from zimage.auth import checked, default_actor

    if actor is None and not user:
        raise UserError(f"{verb} {item.name}: say who you are first (your name in the sidebar, or the OS user)")
    who = default_actor(settings, actor, user)
    kind = "lora" if item.kind == "lora" else "finetune"
    return checked(settings, who, f"{kind}.{verb}", target=f"{kind}:{item.name}", owner=item.owner,
                   folder=item.run_dir, what=f"{'LoRA' if kind == 'lora' else 'fine-tune'} {item.name}")  # fmt: skip


def delete_item(settings: Settings, name: str, user: str | None, kind: str | None = None, actor=None) -> LibraryItem:
    """Delete one LoRA (with its text encoder part) or fine-tune folder as `user` (or the zimage.auth
    `actor`): owner or admin; the event goes to events.jsonl. Returns what went."""
    item = get_item(settings, name, kind)
    models = settings.models_dir.resolve()
    if not item.path.resolve().is_relative_to(models):
        raise UserError(f"{item.name}: {item.path} is outside {models}; not deleting it")
    with acting_checked(settings, user, "delete", item, actor) as note:
        if item.kind == "finetune":
            shutil.rmtree(item.path)
        else:
            for extra in item.extras:
                extra.unlink(missing_ok=True)
            item.path.unlink()
        note["detail"] = f"deleted {item.path}"
    return item
