"""The TrainingConfig dataclass and its flat JSON/YAML interchange form (DESIGN.md section 3).

The flat field names are the contract between the CLI, the Train page, the job queue and the registry:
`config.json` in a run folder is exactly `asdict(TrainingConfig)`. Parsing collects every problem
(unknown keys, wrong types) instead of stopping at the first; `validate.py` then checks values.
"""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from zimage.errors import UserError

CONFIG_VERSION = 1

TRAINING_TYPES = ("lora", "finetune")
MIXED_PRECISIONS = ("bf16", "fp16", "no")
SAVE_DTYPES = ("bf16", "fp16", "fp32")
TIMESTEP_SAMPLINGS = ("sigmoid", "logit_normal", "uniform", "shift", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# diffusers.optimization.SchedulerType without piecewise_constant (tests/test_config.py checks it is the same
# list; written here so that validating a config in the app imports neither diffusers nor torch)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
# Module paths inside one transformer block (DESIGN.md section 4) and the block groups that hold them.
TARGET_MODULES = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",
)
TARGET_BLOCKS = ("layers", "noise_refiner", "context_refiner")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # report_to names (zimage.training.trackers)
DEFAULT_TARGET_MODULES = TARGET_MODULES[:7]  # attention + feed-forward, as the public trainers do

# Nested sections accepted on top of the flat form: {"lora": {"lora_rank": 8}} == {"lora_rank": 8}.
SECTIONS = ("model", "dataset", "lora", "training", "optimizer_settings", "memory", "output", "sampling", "logging")


@dataclass
class TrainingConfig:
    """Everything a training run needs. `None` means "follow the model / dataset" (filled in by validation)."""

    config_version: int = CONFIG_VERSION  # bumped when a field changes meaning; old files get migrated
    training_type: str = "lora"  # "lora" | "finetune" (full fine-tune needs an undistilled model: De-Turbo or base)

    # -- model
    model_path: str = (
        "z-image-turbo"  # catalogue name (z-image, z-image-turbo, z-image-de-turbo, tiny-zimage) or a folder
    )
    model_type: str | None = None  # "turbo" | "de_turbo" | "base"; None: the catalogue's type for model_path
    use_training_adapter: bool | None = None  # None: on for Turbo, off for De-Turbo
    training_adapter_path: str | None = None  # None: the catalogue's adapter file in models/training_adapter/

    # -- dataset
    dataset_path: str = ""  # a dataset name under datasets/ or a folder
    resolution: int = 1024  # buckets hold about resolution² pixels; sides are multiples of 16
    trigger_word: str | None = None  # None: dataset.json's trigger_word; replaces [trigger], else prepended
    caption_dropout: float = 0.05  # chance that a sample trains on the empty caption
    min_image_side: int | None = None  # smaller images are skipped; None: resolution // 4

    # -- LoRA
    lora_rank: int = 32
    lora_alpha: float = 32.0  # LoRA output is scaled by alpha / rank
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    lora_target_blocks: list[str] = field(default_factory=lambda: ["layers"])  # main layers; refiners excluded
    train_text_encoder: bool = False
    init_lora: str | None = None  # continue from this LoRA file's weights; rank, alpha, targets come from it

    # -- optimisation
    learning_rate: float = 1e-4
    num_steps: int = 1000  # optimizer steps (each one sees batch_size x gradient_accumulation images)
    batch_size: int = 1
    gradient_accumulation: int = 4
    optimizer: str = "adamw8bit"  # adamw | adamw8bit | adafactor | prodigy
    weight_decay: float = 0.01
    lr_scheduler: str = "cosine"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0  # 0 turns clipping off (the norm is still logged)
    seed: int = 42
    timestep_sampling: str = "sigmoid"  # sigmoid | logit_normal | uniform | shift | mode
    timestep_shift: float | None = None  # "shift": sigma = s*u / (1 + (s-1)*u); None: the model's scheduler shift
    logit_mean: float = 0.0  # used by "logit_normal"
    logit_std: float = 1.0  # used by "logit_normal"
    loss_weighting: str = "none"  # none | sigma_sqrt | cosmap (diffusers.training_utils)
    # Differential output preservation (also as `preservation: {weight, prompt}`): 0 is off. The trigger
    # word in each caption is replaced by `preservation_prompt` and the LoRA is pulled towards the base
    # model's output on it (MSE x weight).
    preservation_weight: float = 0.0
    preservation_prompt: str = ""  # the class prompt, e.g. "a person"

    # -- validation loss: fixed images, noise seeds and sigmas, measured in eval mode without grad
    validation_images: str | None = None  # a dataset name / folder, or a held-out fraction ("0.1"); None: off
    validation_sigmas: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    validation_every_n_steps: int = 100  # 0: only at the end

    # -- memory
    quantize: bool | str = False  # frozen transformer via bitsandbytes: false, true / "8bit", or "nf4" (4-bit); CUDA
    quantize_te: bool | str = False  # the same for the text encoder (used while caching text embeddings)
    gradient_checkpointing: bool = True
    mixed_precision: str = "bf16"  # bf16 | fp16 | no

    # -- output
    output_name: str = "trained_lora"  # file name (without .safetensors)
    output_dir: str | None = None  # None: models/loras/trained under ZIMAGE_HOME; relative paths are under it
    overwrite: bool = False  # an existing output file is refused unless this is true
    save_dtype: str = "bf16"  # dtype of the saved LoRA weights
    save_every_n_steps: int = 500  # checkpoints (0: off)
    keep_last_n_checkpoints: int = 3

    # -- sampling during training
    sample_every_n_steps: int = 100  # 0: off
    sample_prompt: str = ""
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int | None = None  # None: the model's default (Turbo 8, De-Turbo 25)
    sample_cfg: float | None = None  # CFG in the usual sense, 1.0 = off; None: the model's default
    sample_negative_prompt: str | None = None  # used when CFG is on; None: the model's default (base: one)
    sample_seed: int = 42  # prompt i uses seed sample_seed + i, the same at every step
    sample_resolution: int | None = None  # square side of samples; None: the training resolution

    # -- logging
    log_every_n_steps: int = 1
    report_to: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb, mlflow (the [trackers] extra)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> TrainingConfig:
        data = self.to_dict()
        data.update(changes)
        return TrainingConfig(**data)


FIELD_NAMES = tuple(f.name for f in fields(TrainingConfig))
_HINTS = typing.get_type_hints(TrainingConfig)


@dataclass(frozen=True)
class ConfigProblem:
    """One bad field: its name, the value given and what is allowed."""

    field: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        return f"{self.field} = {self.value!r}: {self.allowed}"


class ConfigError(UserError):
    """A config that cannot start a run; `problems` lists every bad field at once."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"The training config has {len(self.problems)} problem(s):\n{lines}")


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list or hint is list:
        return "a list of numbers" if typing.get_args(hint) == (float,) else "a list of strings"
    base = args[0] if args else hint
    text = names.get(base, getattr(base, "__name__", str(base)))
    return text + (" or null" if type(None) in typing.get_args(hint) else "")


QUANTIZE_FIELDS = ("quantize", "quantize_te")
_QUANTIZE_WORDS = {"none": False, "false": False, "no": False, "off": False, "8bit": True, "int8": True,
                   "true": True, "nf4": "nf4", "4bit": "nf4"}  # fmt: skip


def _coerce_quantize(value: Any) -> tuple[Any, str | None]:
    """false / true (8-bit) / "8bit" / "nf4": stored as False, True (8-bit) or "nf4"."""
    if isinstance(value, bool):
        return value, None
    if isinstance(value, str) and value.strip().lower() in _QUANTIZE_WORDS:
        return _QUANTIZE_WORDS[value.strip().lower()], None
    return value, 'must be false, true or "8bit" (8-bit), or "nf4" (4-bit NF4)'


def _coerce(name: str, value: Any) -> tuple[Any, str | None]:
    """Return (value, None) converted to the field's type, or (value, reason) when it does not fit."""
    if name in QUANTIZE_FIELDS:
        return _coerce_quantize(value)
    hint = _HINTS[name]
    optional = type(None) in typing.get_args(hint)
    if value is None:
        return (None, None) if optional else (value, f"must be {_describe(hint)}")
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if typing.get_origin(base) is list and typing.get_args(base) == (float,):
        if isinstance(value, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value], None
        return value, "must be a list of numbers"
    if name == "validation_images" and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value), None  # a held-out fraction written as a number
    if typing.get_origin(base) is list:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value), None
        return value, "must be a list of strings"
    if base is bool:
        return (value, None) if isinstance(value, bool) else (value, "must be true or false")
    if base is int:
        if isinstance(value, bool):
            return value, "must be an integer"
        if isinstance(value, int):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        if isinstance(value, str):
            try:
                return int(value.strip()), None
            except ValueError:
                pass
        return value, "must be an integer"
    if base is float:
        if isinstance(value, bool):
            return value, "must be a number"
        if isinstance(value, int | float):
            return float(value), None
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value.strip()), None
            except ValueError:
                pass
        return value, "must be a number"
    if base is str:
        if name == "mixed_precision" and value is False:  # YAML 1.1 reads a bare `no` as false
            return "no", None
        return (value, None) if isinstance(value, str) else (value, "must be a string")
    return value, None


def flatten(data: dict[str, Any]) -> dict[str, Any]:
    """Merge nested sections ({"lora": {...}}) into the flat form; flat keys win over nested ones."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                flat.setdefault(inner, inner_value)
        elif key == "preservation" and isinstance(value, dict):  # {weight, prompt} -> preservation_weight, ...
            for inner, inner_value in value.items():
                flat.setdefault(f"preservation_{inner}", inner_value)
    for key, value in data.items():
        if not ((key in SECTIONS or key == "preservation") and isinstance(value, dict)):
            flat[key] = value
    return flat


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring an older config_version up to date (version 1 is the first; nothing to do yet)."""
    return data


def config_from_dict(data: dict[str, Any]) -> TrainingConfig:
    """Build a TrainingConfig from the flat (or sectioned) form; every unknown key or bad type is reported."""
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem("config", type(data).__name__, "must be a mapping of field names to values")])
    data = migrate(flatten(data))
    problems: list[ConfigProblem] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in FIELD_NAMES:
            hint = _closest(key)
            problems.append(
                ConfigProblem(
                    str(key), value, "unknown key" + (f" (did you mean {hint!r}?)" if hint else "; see TrainingConfig")
                )
            )
            continue
        converted, reason = _coerce(key, value)
        if reason:
            problems.append(ConfigProblem(key, value, reason))
        else:
            values[key] = converted
    if problems:
        raise ConfigError(problems)
    return TrainingConfig(**values)


def _closest(key: str) -> str | None:
    import difflib

    match = difflib.get_close_matches(str(key), FIELD_NAMES, n=1, cutoff=0.75)
    return match[0] if match else None


def read_config_file(path: Path | str) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict (not yet checked)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"config file {path}: cannot be read ({exc.strerror or exc})") from exc
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # JSON and YAML each have their own error classes
        raise UserError(f"config file {path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'} ({exc})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: must hold a mapping of field names to values, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is read as YAML, so 8 is a number and [a, b] a list."""
    import yaml

    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
