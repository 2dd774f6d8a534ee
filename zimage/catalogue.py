"""Known base models, the Turbo training adapter, local pipeline folders, and hub downloads.

Every entry knows its model type (turbo / de_turbo / base) and sampling defaults, so configs and pages can
follow the model. Downloads go through huggingface_hub into models/; every way a download can fail
(offline, gated, missing, disk) becomes a DownloadError with one paragraph that says what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zimage.errors import UserError
from zimage.settings import Settings
from zimage.tiny import TINY_MODEL_NAME

MODEL_TYPES = ("turbo", "de_turbo", "base")
# Sampling defaults by model type (DESIGN.md section 3), (steps, CFG in the usual sense: 1.0 = off), for a
# model folder the catalogue does not know; config validation and the Train page read them from here.
# Base: the pipeline's guidance_scale 4-5 is CFG 5-6 in our convention (DESIGN.md section 4).
SAMPLING_DEFAULTS = {"turbo": (8, 1.0), "de_turbo": (25, 3.0), "base": (50, 5.0)}
# Undistilled models: sampled with CFG and a negative prompt, and the ones a full fine-tune may train.
UNDISTILLED_TYPES = ("de_turbo", "base")
# The negative prompt a base-model sample uses when a config leaves sample_negative_prompt unset.
BASE_NEGATIVE_PROMPT = "blurry, low quality, distorted, deformed, watermark, text"
NEGATIVE_PROMPTS = {"turbo": "", "de_turbo": "", "base": BASE_NEGATIVE_PROMPT}
BASE_REASON = "recommended for training; also loads on Turbo"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# What a folder needs to be loaded by diffusers.ZImagePipeline.from_pretrained.
PIPELINE_PARTS = {
    "model_index.json": "the pipeline index (model_index.json)",
    "transformer/config.json": "the transformer config (transformer/config.json)",
    "vae/config.json": "the VAE config (vae/config.json)",
    "text_encoder/config.json": "the text encoder config (text_encoder/config.json)",
    "tokenizer": "the tokenizer folder (tokenizer/)",
    SCHEDULER_CONFIG: "the scheduler config (scheduler/scheduler_config.json)",
}
_WEIGHT_FOLDERS = ("transformer", "vae", "text_encoder")


@dataclass(frozen=True)
class TrainingAdapter:
    repo_id: str
    filename: str


@dataclass(frozen=True)
class ModelEntry:
    name: str  # folder name under models/base and the id used in configs
    title: str
    model_type: str  # "turbo" | "de_turbo" | "base"
    sample_steps: int
    sample_cfg: float  # CFG in the usual sense: 1.0 = off (DESIGN.md section 4)
    repo_id: str | None = None  # None: local only
    adapter: TrainingAdapter | None = None
    description: str = ""


TURBO_ADAPTER = TrainingAdapter("ostris/zimage_turbo_training_adapter", "zimage_turbo_training_adapter_v2.safetensors")

KNOWN_MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="z-image",
        title="Z-Image (base)",
        model_type="base",
        sample_steps=50,
        sample_cfg=5.0,
        repo_id="Tongyi-MAI/Z-Image",
        description=f"Undistilled 6B base model: {BASE_REASON}. No adapter; ~50 steps, CFG 5 and a negative prompt.",
    ),
    ModelEntry(
        name="z-image-turbo",
        title="Z-Image-Turbo",
        model_type="turbo",
        sample_steps=8,
        sample_cfg=1.0,
        repo_id="Tongyi-MAI/Z-Image-Turbo",
        adapter=TURBO_ADAPTER,
        description="Step-distilled 6B model, 8-9 steps, no CFG. Train LoRAs with the training adapter.",
    ),
    ModelEntry(
        name="z-image-de-turbo",
        title="Z-Image-De-Turbo",
        model_type="de_turbo",
        sample_steps=25,
        sample_cfg=3.0,
        repo_id="ostris/Z-Image-De-Turbo",
        description="De-distilled Turbo for longer runs and full fine-tunes; 20-30 steps with CFG 2-3.",
    ),
    ModelEntry(
        name=TINY_MODEL_NAME,
        title="Tiny demo model (offline)",
        model_type="de_turbo",
        sample_steps=4,
        sample_cfg=2.0,
        description="2 MB random-weight Z-Image pipeline built by `zimage demo`; for trying the studio and tests.",
    ),
)


class CatalogueError(UserError):
    """A model that cannot be used; the message says why and what to do."""


class DownloadError(CatalogueError):
    pass


def known(name: str) -> ModelEntry | None:
    return next((m for m in KNOWN_MODELS if m.name == name or m.repo_id == name), None)


def missing_parts(path: Path) -> list[str]:
    """What a folder lacks to be a Z-Image pipeline in diffusers layout (empty list: nothing)."""
    path = Path(path)
    if not path.is_dir():
        return [f"the folder itself ({path} does not exist)"]
    missing = [desc for rel, desc in PIPELINE_PARTS.items() if not (path / rel).exists()]
    for sub in _WEIGHT_FOLDERS:
        folder = path / sub
        if folder.is_dir() and not any(folder.glob("*.safetensors")):
            missing.append(f"{sub} weights (*.safetensors in {sub}/)")
    index = path / "model_index.json"
    if index.exists():
        try:
            cls = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, OSError):
            cls = None
        if cls != "ZImagePipeline":
            missing.append(f"a ZImagePipeline model_index.json (found _class_name={cls!r})")
    return missing


def _local_entry(path: Path) -> ModelEntry:
    meta_path = path / "zimage_model.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    entry = known(path.name)
    if entry is not None:
        return entry
    lower = path.name.lower()
    model_type = meta.get("model_type") or ("de_turbo" if "de-turbo" in lower or "deturbo" in lower else "turbo")
    if not meta.get("model_type") and lower in ("z-image", "z-image-base", "zimage-base"):
        model_type = "base"
    if model_type not in MODEL_TYPES:
        model_type = "turbo"
    steps, cfg = SAMPLING_DEFAULTS[model_type]
    steps, cfg = int(meta.get("sample_steps", steps)), float(meta.get("sample_cfg", cfg))
    return ModelEntry(name=path.name, title=path.name, model_type=model_type, sample_steps=steps, sample_cfg=cfg)


def scheduler_shift(model_dir: Path) -> float:
    """The static shift of a pipeline folder's flow-match scheduler (DESIGN.md section 4: read it from the
    model's own scheduler config, never a constant); 1.0, diffusers' default, when the config has none."""
    try:
        config = json.loads((Path(model_dir) / SCHEDULER_CONFIG).read_text(encoding="utf-8"))
        return float(config.get("shift", 1.0))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CatalogueError(f"{Path(model_dir) / SCHEDULER_CONFIG}: cannot be read ({exc})") from exc


@dataclass(frozen=True)
class ModelStatus:
    entry: ModelEntry
    path: Path | None  # local folder, if present and complete
    problem: str = ""  # why a present folder is unusable


def list_models(settings: Settings) -> list[ModelStatus]:
    """Known models (downloaded or not) plus every other folder under models/base."""
    rows: list[ModelStatus] = []
    seen: set[str] = set()
    for entry in KNOWN_MODELS:
        folder = settings.base_models_dir / entry.name
        present = folder.is_dir() and not missing_parts(folder)
        rows.append(ModelStatus(entry, folder if present else None))
        seen.add(entry.name)
    if settings.base_models_dir.is_dir():
        for folder in sorted(settings.base_models_dir.iterdir()):
            if not folder.is_dir() or folder.name in seen or folder.name.startswith("."):
                continue
            missing = missing_parts(folder)
            rows.append(
                ModelStatus(
                    _local_entry(folder),
                    None if missing else folder,
                    problem="missing " + ", ".join(missing) if missing else "",
                )
            )
    return rows


def resolve(name_or_path: str, settings: Settings) -> tuple[ModelEntry, Path]:
    """Turn a catalogue name, a hub id or a folder path into (entry, local pipeline folder).

    Does not download: a known model that is not on disk raises with the command that fetches it.
    """
    candidate = Path(name_or_path).expanduser()
    entry = known(name_or_path)
    if entry is not None:
        folder = settings.base_models_dir / entry.name
        if folder.is_dir() and not missing_parts(folder):
            return entry, folder
        if entry.repo_id is None:
            raise CatalogueError(f"{entry.title} is not built yet: run `zimage demo` to create it in {folder}.")
        raise CatalogueError(
            f"{entry.title} is not downloaded yet: run `zimage models download {entry.name}` (it goes to {folder})."
        )
    if not candidate.is_absolute():
        under_base = settings.base_models_dir / name_or_path
        candidate = under_base if under_base.is_dir() else candidate
    if candidate.is_dir():
        missing = missing_parts(candidate)
        if missing:
            raise CatalogueError(f"{candidate} is not a Z-Image pipeline folder: missing " + "; ".join(missing) + ".")
        return _local_entry(candidate), candidate.resolve()
    raise CatalogueError(
        f"Unknown model {name_or_path!r}: not a catalogue name ({', '.join(m.name for m in KNOWN_MODELS)}) "
        "and not an existing folder."
    )


def explain_hub_error(exc: Exception, repo_id: str) -> DownloadError:
    from huggingface_hub import errors

    if isinstance(exc, errors.GatedRepoError):
        msg = (
            f"{repo_id} is gated: accept its licence on the model page with your Hugging Face account, "
            "then log in on this server (`hf auth login` or set HF_TOKEN) and run the download again."
        )
    elif isinstance(exc, errors.RepositoryNotFoundError | errors.RevisionNotFoundError):
        msg = (
            f"{repo_id} was not found on the Hugging Face Hub (or it is private). Check the spelling; for a "
            "private repo log in first (`hf auth login` or HF_TOKEN)."
        )
    elif isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled | ConnectionError):
        msg = (
            f"Could not download {repo_id}: this machine cannot reach the Hugging Face Hub (offline, "
            "HF_HUB_OFFLINE=1 or no network). Download it on a connected machine and copy the folder into "
            "models/base/, or point the config's model_path at a local diffusers folder."
        )
    elif isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        msg = f"Ran out of disk space while downloading {repo_id}. Free space under models/ and try again."
    else:
        msg = f"Downloading {repo_id} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return DownloadError(msg)


def _remove_if_empty(folder: Path) -> None:
    """Drop a folder a failed download created but filled with nothing but hub bookkeeping."""
    import shutil

    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*") if ".cache" not in p.parts):
        shutil.rmtree(folder, ignore_errors=True)


def download(name: str, settings: Settings, progress: Callable[[str], None] | None = None, tqdm_class=None) -> Path:
    """Download a known hub model into models/base/<name> (resumable; no-op when complete)."""
    from huggingface_hub import snapshot_download

    entry = known(name)
    if entry is None or entry.repo_id is None:
        raise CatalogueError(f"{name!r} is not a downloadable catalogue model.")
    folder = settings.base_models_dir / entry.name
    if folder.is_dir() and not missing_parts(folder):
        return folder
    if progress:
        progress(f"Downloading {entry.repo_id} into {folder} ...")
    existed = folder.exists()
    try:
        snapshot_download(entry.repo_id, local_dir=folder, tqdm_class=tqdm_class)
    except Exception as exc:  # every hub failure becomes one readable paragraph
        if not existed:
            _remove_if_empty(folder)
        raise explain_hub_error(exc, entry.repo_id) from exc
    missing = missing_parts(folder)
    if missing:
        raise DownloadError(f"{entry.repo_id} downloaded but is incomplete: missing " + "; ".join(missing) + ".")
    return folder


def download_adapter(adapter: TrainingAdapter, settings: Settings) -> Path:
    """Fetch the training adapter file into models/training_adapter/ (no-op when present)."""
    from huggingface_hub import hf_hub_download

    target = settings.adapter_dir / adapter.filename
    if target.exists():
        return target
    try:
        return Path(hf_hub_download(adapter.repo_id, adapter.filename, local_dir=settings.adapter_dir))
    except Exception as exc:
        raise explain_hub_error(exc, adapter.repo_id) from exc
