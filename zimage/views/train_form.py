"""The Train page's form: its fields in the grouping of PLAN.md section 2.3, the values <-> TrainingConfig,
model-aware sampling defaults, and validation problems keyed by field (shown next to each widget).

Form values live in a mapping (the page passes st.session_state) under `KEY + field name`; settings the
form does not show (kept when a run is cloned) live under EXTRA_KEY. The functions that change values
(`apply_values`, `on_model_change`, `on_model_type_change`) are meant for widget callbacks, which run
before the widgets are drawn again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from zimage import catalogue
from zimage.config import (
    TARGET_BLOCKS,
    TARGET_MODULES,
    ConfigError,
    ConfigProblem,
    ResolvedConfig,
    TrainingConfig,
    config_from_dict,
    validate_config,
)
from zimage.config.schema import MIXED_PRECISIONS, TIMESTEP_SAMPLINGS, TRAINING_TYPES
from zimage.config.validate import SAMPLING_DEFAULTS, output_dir_for
from zimage.data.folders import list_datasets
from zimage.optimizers import OPTIMIZERS
from zimage.settings import Settings

KEY = "tr_"
EXTRA_KEY = "tr__extra"
URL_FIELDS = ("dataset_path",)  # form fields shown in the page's URL, so a link or a reload opens the same choice
GROUPS = {"basic": "Basic", "lora": "LoRA", "training": "Training", "advanced": "Advanced", "samples": "Samples"}
MODEL_TYPE_LABELS = {"turbo": "Turbo (+ training adapter)", "de_turbo": "De-Turbo",
                     "base": f"Base ({catalogue.BASE_REASON})"}  # fmt: skip
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")


def linked_choices(settings: Settings, params: Mapping[str, Any], preset_names: list[str]) -> dict[str, Any]:
    """The preset and dataset a link or a reload names (`?tr_preset=…&tr_dataset_path=…`), where they exist;
    the first preset otherwise. For the first visit of a browser session, before the preset's values apply."""
    preset = params.get("tr_preset")
    out: dict[str, Any] = {"tr_preset": preset if preset in preset_names else preset_names[0]}
    dataset = params.get(KEY + "dataset_path")
    if dataset and dataset in {d.path.name for d in list_datasets(settings.datasets_dir)}:
        out[KEY + "dataset_path"] = dataset
    return out


@dataclass(frozen=True)
class FormField:
    """One widget of the form: a TrainingConfig field, its label, group and kind of widget."""

    name: str
    label: str
    group: str
    kind: str  # select | text | area | int | float | bool | multi
    options: tuple = ()
    step: float | None = None
    fmt: str | None = None
    help: str = ""


_FIELDS = (
    FormField("training_type", "Training type", "basic", "select", TRAINING_TYPES,
              help="LoRA: a small add-on file. Full fine-tune: every weight (De-Turbo or base only)."),
    FormField("model_path", "Base model", "basic", "select"),
    FormField("model_type", "Model type", "basic", "select", tuple(MODEL_TYPE_LABELS),
              help="Turbo trains with the training adapter and samples at 8 steps without CFG; De-Turbo "
                   "samples at 20-30 steps with CFG 2-3; base (recommended for training; also loads on Turbo) "
                   "at ~50 steps with CFG 5 and a negative prompt."),
    FormField("dataset_path", "Dataset", "basic", "select"),
    FormField("output_name", "Output name", "basic", "text", help="File name of the LoRA (without .safetensors)."),
    FormField("trigger_word", "Trigger word", "basic", "text", help="Empty: the dataset's trigger word."),
    FormField("resolution", "Resolution", "basic", "int", step=64, help="Training image size (multiple of 16)."),
    FormField("lora_rank", "Rank (dim)", "lora", "int", step=1, help="8-128; higher = more capacity, bigger file."),
    FormField("lora_alpha", "Alpha", "lora", "float", step=1.0, fmt="%.1f", help="Usually the same as the rank."),
    FormField("lora_target_modules", "Target modules", "lora", "multi", TARGET_MODULES),
    FormField("lora_target_blocks", "Target blocks", "lora", "multi", TARGET_BLOCKS),
    FormField("train_text_encoder", "Train the text encoder", "lora", "bool"),
    FormField("init_lora", "Start from a LoRA file", "lora", "text",
              help="Path of a .safetensors LoRA to continue from; its rank, alpha and targets are used. Empty: none."),
    FormField("learning_rate", "Learning rate", "training", "float", step=1e-5, fmt="%.2e"),
    FormField("num_steps", "Steps", "training", "int", step=50),
    FormField("batch_size", "Batch size", "training", "int", step=1),
    FormField("gradient_accumulation", "Gradient accumulation", "training", "int", step=1),
    FormField("optimizer", "Optimizer", "training", "select", OPTIMIZERS),
    FormField("lr_scheduler", "LR scheduler", "training", "select", SCHEDULERS),
    FormField("lr_warmup_steps", "Warm-up steps", "training", "int", step=10),
    FormField("seed", "Seed", "training", "int", step=1),
    FormField("validation_images", "Validation images", "training", "text",
              help="A dataset name, or the fraction of the training images to hold out (0.1). Empty: no val_loss."),
    FormField("validation_every_n_steps", "Validation every N steps (0: at the end)", "training", "int", step=50),
    FormField("use_training_adapter", "Use the training adapter (Turbo)", "advanced", "bool"),
    FormField("quantize", "Quantize the model (8-bit, CUDA)", "advanced", "bool"),
    FormField("quantize_te", "Quantize the text encoder", "advanced", "bool"),
    FormField("mixed_precision", "Mixed precision", "advanced", "select", MIXED_PRECISIONS),
    FormField("gradient_checkpointing", "Gradient checkpointing", "advanced", "bool"),
    FormField("caption_dropout", "Caption dropout", "advanced", "float", step=0.01, fmt="%.2f"),
    FormField("max_grad_norm", "Max grad norm (0: off)", "advanced", "float", step=0.1, fmt="%.2f"),
    FormField("timestep_sampling", "Timestep sampling", "advanced", "select", TIMESTEP_SAMPLINGS),
    FormField("save_every_n_steps", "Save every N steps (0: off)", "advanced", "int", step=50),
    FormField("keep_last_n_checkpoints", "Keep last N checkpoints", "advanced", "int", step=1),
    FormField("sample_every_n_steps", "Sample every N steps (0: off)", "advanced", "int", step=50),
    FormField("preservation_weight", "Preservation weight (0: off)", "advanced", "float", step=0.1, fmt="%.2f",
              help="Keep the base model's output on the class prompt (the trigger word replaced)."),
    FormField("preservation_prompt", "Preservation class prompt", "advanced", "text", help="e.g. a person"),
    FormField("sample_prompt", "Sample prompt", "samples", "area"),
    FormField("sample_steps", "Sample steps", "samples", "int", step=1),
    FormField("sample_cfg", "Sample CFG (1.0 = off)", "samples", "float", step=0.5, fmt="%.1f"),
    FormField("sample_negative_prompt", "Negative prompt (with CFG)", "samples", "text",
              help="Empty: the model's default (base: a short list of defects)."),
    FormField("sample_seed", "Sample seed", "samples", "int", step=1),
)  # fmt: skip
FIELD_NAMES = tuple(f.name for f in _FIELDS)


# -- models and datasets ---------------------------------------------------------------------------
def model_entries(settings: Settings) -> dict[str, tuple[catalogue.ModelEntry, bool]]:
    """Catalogue and local models: name -> (entry, on disk)."""
    return {m.entry.name: (m.entry, m.path is not None) for m in catalogue.list_models(settings)}


def model_label(name: str, entries: Mapping[str, tuple[catalogue.ModelEntry, bool]]) -> str:
    if name not in entries:
        return name
    entry, ready = entries[name]
    reason = f" · {catalogue.BASE_REASON}" if entry.model_type == "base" else ""
    return f"{entry.title} · {entry.model_type}{reason} · {'ready' if ready else 'not on disk'}"


def model_entry(settings: Settings, name: str) -> catalogue.ModelEntry | None:
    entry = catalogue.known(name) or model_entries(settings).get(name, (None, False))[0]
    if entry is None:
        try:
            entry = catalogue.resolve(name, settings)[0]
        except catalogue.CatalogueError:
            return None
    return entry


def dataset_names(settings: Settings) -> list[str]:
    return [folder.path.name for folder in list_datasets(settings.datasets_dir)]


def sample_defaults(entry: catalogue.ModelEntry | None, model_type: str) -> tuple[int, float]:
    """(sample steps, CFG): the model's own defaults when its type is kept, else the type's."""
    if entry is not None and entry.model_type == model_type:
        return entry.sample_steps, float(entry.sample_cfg)
    steps, cfg = SAMPLING_DEFAULTS.get(model_type, SAMPLING_DEFAULTS["turbo"])
    return steps, float(cfg)


def fields(settings: Settings, values: Mapping[str, Any]) -> list[FormField]:
    """The form's fields with today's options (models, datasets); a current value is always an option."""
    dynamic = {"model_path": list(model_entries(settings)), "dataset_path": dataset_names(settings)}
    out = []
    for f in _FIELDS:
        if f.name in dynamic or f.kind == "select":
            options = list(dynamic.get(f.name, f.options))
            current = values.get(f.name)
            if current not in (None, "") and current not in options:
                options.append(current)
            f = FormField(**{**f.__dict__, "options": tuple(options)})
        out.append(f)
    return out


def by_group(form_fields: Iterable[FormField]) -> dict[str, list[FormField]]:
    out: dict[str, list[FormField]] = {g: [] for g in GROUPS}
    for f in form_fields:
        out[f.group].append(f)
    return out


# -- values <-> config -----------------------------------------------------------------------------
def _widget_value(f_name: str, value: Any) -> Any:
    kind = next(f.kind for f in _FIELDS if f.name == f_name)
    if kind == "int":
        return int(value) if value is not None else 0
    if kind == "float":
        return float(value) if value is not None else 0.0
    if kind in ("text", "area"):
        return "" if value is None else str(value)
    if kind == "multi":
        return list(value or [])
    if kind == "bool":
        return bool(value)
    return value


def free_output_name(settings: Settings, base: str, taken: Iterable[str] = ()) -> str:
    """`base`, or `base-2`, `base-3`... when a LoRA file of that name exists or a waiting run will write it."""
    taken = set(taken)
    folder = settings.loras_dir
    numbered = re.fullmatch(r"(.+)-(\d{1,4})", base)
    if numbered and (base in taken or (folder / f"{base}.safetensors").exists()):
        base = numbered.group(1)  # quick_test-2 taken: try quick_test-3, not quick_test-2-2
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base}-{n}"
        if name not in taken and not (folder / f"{name}.safetensors").exists():
            return name
    return base


def complete_values(settings: Settings, raw: Mapping[str, Any], taken: Iterable[str] = ()) -> dict[str, Any]:
    """Form values from a partial flat config: TrainingConfig defaults below, model/dataset/sampling filled."""
    data = TrainingConfig().to_dict()
    data.update({k: v for k, v in raw.items() if k in data})
    if not raw.get("model_path"):  # no model named: the first one on disk
        ready = [name for name, (_, on_disk) in model_entries(settings).items() if on_disk]
        data["model_path"] = ready[0] if ready else data["model_path"]
    entry = model_entry(settings, data["model_path"])
    data["model_type"] = data.get("model_type") or (entry.model_type if entry else "turbo")
    if data.get("use_training_adapter") is None:
        data["use_training_adapter"] = data["model_type"] == "turbo"
    steps, cfg = sample_defaults(entry, data["model_type"])
    data["sample_steps"] = data["sample_steps"] if data.get("sample_steps") is not None else steps
    data["sample_cfg"] = data["sample_cfg"] if data.get("sample_cfg") is not None else cfg
    if not data.get("dataset_path"):
        names = dataset_names(settings)
        data["dataset_path"] = names[0] if names else ""
    data["output_name"] = free_output_name(settings, data.get("output_name") or "trained_lora", taken)
    return data


def apply_values(state: MutableMapping, values: Mapping[str, Any]) -> None:
    """Put complete values into the form (widget keys) and keep the fields it does not show."""
    for name in FIELD_NAMES:
        state[KEY + name] = _widget_value(name, values.get(name))
    state[EXTRA_KEY] = {k: v for k, v in values.items() if k not in FIELD_NAMES}


def read_values(state: Mapping) -> dict[str, Any]:
    """The form's values plus the hidden ones, as flat config fields."""
    values = dict(state.get(EXTRA_KEY) or {})
    values.update({name: state.get(KEY + name) for name in FIELD_NAMES if KEY + name in state})
    return values


def config_from_values(values: Mapping[str, Any]) -> TrainingConfig:
    """The TrainingConfig the form describes (an empty trigger word follows the dataset); ConfigError on bad types."""
    data = {k: v for k, v in values.items() if k in TrainingConfig.__dataclass_fields__}
    for name in ("trigger_word", "validation_images", "init_lora", "sample_negative_prompt"):
        if name in data and not str(data.get(name) or "").strip():
            data[name] = None  # empty: follow the dataset / model, or off
    for name in ("output_name", "trigger_word"):
        if isinstance(data.get(name), str):
            data[name] = data[name].strip()
    return config_from_dict(data)


def on_model_change(state: MutableMapping, settings: Settings) -> None:
    """Callback: a new base model brings its type, sampling defaults and adapter setting."""
    entry = model_entry(settings, state.get(KEY + "model_path") or "")
    if entry is not None:
        state[KEY + "model_type"] = entry.model_type
    on_model_type_change(state, settings)


def on_model_type_change(state: MutableMapping, settings: Settings) -> None:
    """Callback: Turbo <-> De-Turbo changes the sample steps, CFG and the training adapter switch."""
    model_type = state.get(KEY + "model_type") or "turbo"
    steps, cfg = sample_defaults(model_entry(settings, state.get(KEY + "model_path") or ""), model_type)
    state[KEY + "sample_steps"] = int(steps)
    state[KEY + "sample_cfg"] = float(cfg)
    state[KEY + "use_training_adapter"] = model_type == "turbo"


# -- validation ------------------------------------------------------------------------------------
def check(
    values: Mapping[str, Any], settings: Settings, busy_outputs: Mapping[str, str] | None = None
) -> tuple[dict[str, list[str]], ResolvedConfig | None]:
    """(problems by field, resolved config when there are none). `busy_outputs`: output_name -> run id of
    queued or running runs, which will write that file before this one could."""
    problems: list[ConfigProblem] = []
    resolved = None
    try:
        config = config_from_values(values)
        resolved = validate_config(config, settings)
    except ConfigError as exc:
        problems = exc.problems
    name = str(values.get("output_name") or "").strip()
    if busy_outputs and name in busy_outputs:
        folder = output_dir_for(TrainingConfig(output_dir=values.get("output_dir")), settings)
        problems.append(ConfigProblem("output_name", name, f"run {busy_outputs[name]} (waiting or running) will "
                                      f"write {folder / name}.safetensors; choose another name"))  # fmt: skip
        resolved = None
    out: dict[str, list[str]] = {}
    for p in problems:
        out.setdefault(p.field, []).append(p.allowed)
    return out, resolved


def unplaced(problems: Mapping[str, list[str]]) -> list[str]:
    """Problems of fields the form does not show (they get one box above the Launch button)."""
    return [f"{name}: {msg}" for name, msgs in problems.items() if name not in FIELD_NAMES for msg in msgs]
