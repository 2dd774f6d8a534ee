"""Check a TrainingConfig against the rules, the disk and this machine; report every problem at once.

`validate_config` returns a ResolvedConfig: the config with every "follow the model/dataset" default
filled in, plus the resolved paths a trainer needs. An invalid config raises ConfigError and nothing
else happens (no folder created, no file written).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from zimage import catalogue
from zimage.config.limits import (
    NAME_PATTERN,
    output_root_problem,
    value_problems,
)
from zimage.config.schema import (
    CONFIG_VERSION,
    LOSS_WEIGHTINGS,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    SAVE_DTYPES,
    TARGET_BLOCKS,
    TARGET_MODULES,
    TIMESTEP_SAMPLINGS,
    TRAINING_TYPES,
    ConfigError,
    ConfigProblem,
    TrainingConfig,
)
from zimage.data.folders import BadName, DatasetFolder, DatasetInfo, check_slug
from zimage.data.images import ImageProblem, open_rgb
from zimage.optimizers import OPTIMIZERS
from zimage.settings import Settings

SAMPLING_DEFAULTS = catalogue.SAMPLING_DEFAULTS  # (steps, CFG) by model type; the Train page reads it here


@dataclass(frozen=True)
class MachineInfo:
    """What this machine can run: decides mixed precision, quantization and optimizer checks."""

    cuda: bool
    bf16: bool  # bf16 autocast works here (CPU: yes; CUDA: Ampere or newer)

    @property
    def device_type(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @classmethod
    def detect(cls) -> MachineInfo:
        """Without creating a CUDA context or importing torch (the app validates on every render): the
        visible GPUs from NVML, bf16 from their compute capability, and whether torch is a CUDA build."""
        from zimage.system import bf16_supported, visible_gpus

        devices = visible_gpus()
        cuda = bool(devices) and torch_has_cuda()
        return cls(cuda=cuda, bf16=bf16_supported(devices) if cuda else True)


def torch_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from torch/version.py (`cuda = '12.8'` or None) so that
    the app does not pay torch's import; imports torch only when that file cannot be read."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r"^cuda(?::[^=]*)?=\s*(.+)$", text, re.MULTILINE)
        if found:
            return found.group(1).strip() not in ("None", "")
    import torch

    return torch.version.cuda is not None


@dataclass(frozen=True)
class ResolvedConfig:
    """A valid config with its defaults filled and the paths it points at resolved."""

    config: TrainingConfig
    model_dir: Path
    model_entry: catalogue.ModelEntry
    dataset_dir: Path
    dataset_info: DatasetInfo
    output_path: Path  # <output_dir>/<output_name>.safetensors (a folder <output_dir>/<output_name> for finetune)
    adapter_path: Path | None  # the training adapter merged at +1 before training (Turbo)
    machine: MachineInfo
    warnings: tuple[str, ...] = ()  # valid, but worth knowing before starting (shown and logged)
    validation_dir: Path | None = None  # validation_images as a dataset folder
    validation_fraction: float | None = None  # validation_images as a held-out fraction of the training set
    init_lora_path: Path | None = None  # init_lora resolved (its rank, alpha, targets: training/init_lora.py)


def resolve_dataset(dataset_path: str, settings: Settings) -> Path | None:
    """A dataset name under datasets/ or a folder path; None when neither exists."""
    if not dataset_path:
        return None
    by_name = settings.datasets_dir / dataset_path
    if "/" not in dataset_path and "\\" not in dataset_path and by_name.is_dir():
        return by_name
    folder = Path(dataset_path).expanduser()
    if not folder.is_absolute():
        folder = settings.home / folder if (settings.home / folder).is_dir() else folder
    return folder.resolve() if folder.is_dir() else None


def output_dir_for(config: TrainingConfig, settings: Settings) -> Path:
    if not config.output_dir:
        return settings.finetuned_dir if config.training_type == "finetune" else settings.loras_dir
    folder = Path(config.output_dir).expanduser()
    return folder if folder.is_absolute() else settings.home / folder


def _first_usable_image(folder: DatasetFolder, min_side: int) -> tuple[int, str]:
    """(number of image files, reason the last one failed) — stops at the first image that decodes."""
    items = folder.items()
    reason = ""
    for item in items:
        try:
            open_rgb(item.image, min_side=min_side)
            return len(items), ""
        except ImageProblem as exc:
            reason = str(exc)
    return len(items), reason or "no image files"


@lru_cache(maxsize=16)
def _optimizer_problem(name: str, device_type: str, test_step: bool = True) -> str | None:
    from zimage.optimizers import library_problem, optimizer_problem

    return optimizer_problem(name, device_type) if test_step else library_problem(name)


def _may_touch_cuda(device_type: str) -> bool:
    """Whether to probe the optimizer with a real test step. A step on CUDA (or importing bitsandbytes there)
    initialises CUDA, and any step costs the import of torch (seconds): so only in a process that has torch
    loaded already (a worker, the CLI's train), on the CPU or where CUDA is initialised. The app server
    checks only that the optimizer's library is installed; the worker's own validation probes for real."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and (device_type == "cpu" or torch.cuda.is_initialized())


def validate_config(config: TrainingConfig, settings: Settings, machine: MachineInfo | None = None) -> ResolvedConfig:
    """Check everything; raise ConfigError listing every problem, or return the ResolvedConfig."""
    machine = machine or MachineInfo.detect()
    c = config
    problems: list[ConfigProblem] = []

    def bad(field: str, value, allowed: str) -> None:
        problems.append(ConfigProblem(field, value, allowed))

    # -- values that need nothing but the config (ranges and finiteness: limits.py)
    problems += value_problems(c)
    if c.config_version != CONFIG_VERSION:
        bad("config_version", c.config_version, f"this version of the studio reads config_version {CONFIG_VERSION}")
    if c.training_type not in TRAINING_TYPES:
        bad("training_type", c.training_type, f"must be one of {', '.join(TRAINING_TYPES)}")
    if c.model_type is not None and c.model_type not in catalogue.MODEL_TYPES:
        bad(
            "model_type", c.model_type, f"must be one of {', '.join(catalogue.MODEL_TYPES)} (or null: follow the model)"
        )
    unknown_modules = [m for m in c.lora_target_modules if m not in TARGET_MODULES]
    if unknown_modules or not c.lora_target_modules:
        bad("lora_target_modules", c.lora_target_modules, f"a non-empty list from {', '.join(TARGET_MODULES)}")
    unknown_blocks = [b for b in c.lora_target_blocks if b not in TARGET_BLOCKS]
    if unknown_blocks or not c.lora_target_blocks:
        bad("lora_target_blocks", c.lora_target_blocks, f"a non-empty list from {', '.join(TARGET_BLOCKS)}")
    elif (
        not unknown_modules
        and c.lora_target_modules
        and not any(
            not (b == "context_refiner" and m.startswith("adaLN"))
            for b in c.lora_target_blocks
            for m in c.lora_target_modules
        )
    ):
        bad("lora_target_modules", c.lora_target_modules, "context_refiner blocks have no adaLN_modulation; add others")
    from zimage.config.schema import TRACKERS

    if [t for t in c.report_to if t not in TRACKERS] or len(set(c.report_to)) != len(c.report_to):
        bad("report_to", c.report_to, f"a list of distinct names from {', '.join(TRACKERS)} (or empty: no tracker)")
    warnings: list[str] = []
    if c.train_text_encoder and c.training_type == "finetune":
        bad("train_text_encoder", True, "not supported for a full fine-tune (it trains the transformer only)")
    elif c.train_text_encoder and c.quantize_te:
        bad("train_text_encoder", True, "not supported together with quantize_te; set quantize_te to false")
    elif c.train_text_encoder:
        warnings.append(
            "train_text_encoder: text embeddings cannot be cached while the text encoder trains, so every step "
            "runs the text encoder (slower, and it stays in memory)"
        )
    if c.lr_scheduler not in LR_SCHEDULERS:
        bad("lr_scheduler", c.lr_scheduler, f"must be one of {', '.join(LR_SCHEDULERS)}")
    if c.timestep_sampling not in TIMESTEP_SAMPLINGS:
        bad("timestep_sampling", c.timestep_sampling, f"must be one of {', '.join(TIMESTEP_SAMPLINGS)}")
    if c.loss_weighting not in LOSS_WEIGHTINGS:
        bad("loss_weighting", c.loss_weighting, f"must be one of {', '.join(LOSS_WEIGHTINGS)}")
    if c.save_dtype not in SAVE_DTYPES:
        bad("save_dtype", c.save_dtype, f"must be one of {', '.join(SAVE_DTYPES)}")
    try:
        check_slug(c.output_name, "output_name")
    except BadName as exc:
        bad("output_name", c.output_name, str(exc).split(": ", 1)[-1])
    else:
        if not NAME_PATTERN.fullmatch(c.output_name):  # check_slug's `$` accepts a trailing newline
            bad("output_name", c.output_name, "must be 1-64 lowercase letters, digits, '-' or '_' and nothing else")

    # -- this machine
    if c.mixed_precision not in MIXED_PRECISIONS:
        bad("mixed_precision", c.mixed_precision, f"must be one of {', '.join(MIXED_PRECISIONS)}")
    elif c.mixed_precision == "fp16" and not machine.cuda:
        bad("mixed_precision", "fp16", "fp16 needs a CUDA GPU; use bf16 or no on this machine")
    elif c.mixed_precision == "bf16" and not machine.bf16:
        bad("mixed_precision", "bf16", "this GPU has no bf16 support; use fp16 or no")
    for name in ("quantize", "quantize_te"):
        if getattr(c, name) and not machine.cuda:
            bad(name, getattr(c, name), "bitsandbytes quantized loading needs a CUDA GPU (without one it fails with "
                "'No GPU found'); set it to false on this machine")  # fmt: skip
    if c.quantize and c.training_type == "finetune":
        bad("quantize", c.quantize, "a full fine-tune trains every transformer weight, which cannot be quantized")
    if c.optimizer not in OPTIMIZERS:
        bad("optimizer", c.optimizer, f"must be one of {', '.join(OPTIMIZERS)}")
    else:
        reason = _optimizer_problem(c.optimizer, machine.device_type, _may_touch_cuda(machine.device_type))
        if reason:
            bad("optimizer", c.optimizer, f"cannot run on this machine ({reason}); choose another optimizer")

    # -- the model
    entry, model_dir = None, None
    try:
        entry, model_dir = catalogue.resolve(c.model_path, settings)
    except catalogue.CatalogueError as exc:
        bad("model_path", c.model_path, str(exc))
    shift = c.timestep_shift
    if shift is None and model_dir is not None:
        try:
            shift = catalogue.scheduler_shift(model_dir)
        except catalogue.CatalogueError as exc:
            bad("model_path", c.model_path, str(exc))
    model_type = c.model_type or (entry.model_type if entry else None)
    use_adapter = c.use_training_adapter if c.use_training_adapter is not None else model_type == "turbo"
    adapter_path = None
    if c.training_type == "finetune" and model_type not in catalogue.UNDISTILLED_TYPES:
        bad(
            "training_type", "finetune", "a full fine-tune needs a De-Turbo model or Z-Image base (undistilled: model_type "
            "de_turbo or base): Turbo is step-distilled, and training all of its weights undoes the distillation; use z-image",
        )  # fmt: skip
    if use_adapter and model_type in catalogue.UNDISTILLED_TYPES:
        bad("use_training_adapter", True, f"the training adapter is for Turbo models; {model_type} trains without it")
    elif use_adapter and model_type == "turbo":
        adapter_path = _adapter_path(c, entry, settings)
        if adapter_path is None or not adapter_path.is_file():
            hint = (
                f"run `zimage models download {entry.name}` to fetch it"
                if entry is not None and entry.adapter is not None
                else "set training_adapter_path to the adapter .safetensors file"
            )
            bad("use_training_adapter", True, f"the training adapter file {adapter_path} is missing: {hint}")
    if adapter_path is not None and adapter_path.suffix != ".safetensors":
        bad("training_adapter_path", str(adapter_path), "must be a .safetensors file (pickles are never loaded)")

    # -- the dataset
    dataset_dir = resolve_dataset(c.dataset_path, settings)
    info = DatasetInfo(name="")
    min_side = c.min_image_side if c.min_image_side is not None else c.resolution // 4
    if not c.dataset_path:
        bad("dataset_path", c.dataset_path, "required: a dataset name under datasets/ or a folder of images")
    elif dataset_dir is None:
        bad("dataset_path", c.dataset_path, f"no such dataset in {settings.datasets_dir} and no such folder")
    else:
        folder = DatasetFolder(dataset_dir)
        try:
            info = folder.read_info()
        except (ValueError, TypeError, OSError) as exc:
            bad("dataset_path", c.dataset_path, f"its dataset.json cannot be read ({exc})")
        count, reason = _first_usable_image(folder, min_side)
        if count == 0:
            bad(
                "dataset_path",
                c.dataset_path,
                f"no images in {folder.images_dir if folder.images_dir.is_dir() else dataset_dir}",
            )
        elif reason:
            bad("dataset_path", c.dataset_path, f"none of its {count} images is usable (last: {reason})")

    # -- validation loss, preservation, init_lora (what they point at)
    validation_dir, validation_fraction = None, None
    if c.validation_images is not None and c.validation_images.strip():
        try:
            validation_fraction = float(c.validation_images.strip().rstrip("%")) / (
                100 if c.validation_images.strip().endswith("%") else 1
            )
        except ValueError:
            validation_dir = resolve_dataset(c.validation_images.strip(), settings)
            if validation_dir is None:
                bad("validation_images", c.validation_images, f"no such dataset in {settings.datasets_dir} and no "
                    "such folder (or give a held-out fraction of the training set, e.g. 0.1)")  # fmt: skip
        else:
            if not 0 < validation_fraction < 1:
                bad("validation_images", c.validation_images, "a held-out fraction must be above 0 and below 1")
    if (validation_dir or validation_fraction) and c.train_text_encoder:
        warnings.append("validation_images with train_text_encoder: the validation loss uses the frozen text "
                        "encoder's embeddings, so it measures the transformer LoRA only")  # fmt: skip
    if not c.validation_sigmas or len(c.validation_sigmas) > 32 or not all(0 < s <= 1 for s in c.validation_sigmas):
        bad("validation_sigmas", c.validation_sigmas, "1 to 32 noise levels, each above 0 and at most 1")
    if c.preservation_weight > 0:
        if not c.preservation_prompt.strip():
            bad("preservation_prompt", c.preservation_prompt, "required when preservation_weight > 0 (e.g. a person)")
        if c.training_type != "lora" or c.train_text_encoder:
            bad("preservation_weight", c.preservation_weight, "works on a transformer LoRA only (training_type "
                "lora, train_text_encoder false)")  # fmt: skip
    init_lora_path = None
    if c.init_lora:
        init_lora_path = Path(c.init_lora).expanduser()
        init_lora_path = init_lora_path if init_lora_path.is_absolute() else settings.home / init_lora_path
        if init_lora_path.suffix != ".safetensors" or not init_lora_path.is_file():
            bad("init_lora", c.init_lora, f"{init_lora_path} must be an existing .safetensors LoRA file")
        if c.training_type != "lora":
            bad("init_lora", c.init_lora, "continues a LoRA; a full fine-tune has none")

    # -- the output file
    suffix = "" if c.training_type == "finetune" else ".safetensors"  # a fine-tune is a folder
    output_path = output_dir_for(c, settings) / f"{c.output_name}{suffix}"
    if output_path.exists() and not c.overwrite:
        bad("output_name", c.output_name, f"{output_path} already exists; choose another name or set overwrite: true")
    if output_path.parent.exists() and not output_path.parent.is_dir():
        bad("output_dir", c.output_dir, f"{output_path.parent} is a file, not a folder")
    elif c.output_dir:
        reason = output_root_problem(output_path.parent, settings)
        if reason:
            bad("output_dir", c.output_dir, reason)

    if problems:
        raise ConfigError(problems)
    assert entry is not None and model_dir is not None and dataset_dir is not None
    steps, cfg = (
        (entry.sample_steps, entry.sample_cfg) if model_type == entry.model_type else SAMPLING_DEFAULTS[model_type]
    )
    filled = c.replace(
        model_type=model_type,
        use_training_adapter=use_adapter,
        training_adapter_path=str(adapter_path) if adapter_path else None,
        trigger_word=c.trigger_word if c.trigger_word is not None else info.trigger_word,
        min_image_side=min_side,
        output_dir=str(output_path.parent),
        sample_steps=c.sample_steps if c.sample_steps is not None else steps,
        sample_cfg=c.sample_cfg if c.sample_cfg is not None else cfg,
        timestep_shift=shift,
        sample_negative_prompt=(
            c.sample_negative_prompt
            if c.sample_negative_prompt is not None
            else catalogue.NEGATIVE_PROMPTS.get(model_type, "")
        ),
    )
    return ResolvedConfig(
        config=filled,
        model_dir=model_dir,
        model_entry=entry,
        dataset_dir=dataset_dir,
        dataset_info=info,
        output_path=output_path,
        adapter_path=adapter_path,
        machine=machine,
        warnings=tuple(warnings),
        validation_dir=validation_dir,
        validation_fraction=validation_fraction,
        init_lora_path=init_lora_path,
    )


def _adapter_path(c: TrainingConfig, entry: catalogue.ModelEntry | None, settings: Settings) -> Path | None:
    if c.training_adapter_path:
        path = Path(c.training_adapter_path).expanduser()
        return path if path.is_absolute() else settings.home / path
    adapter = entry.adapter if entry is not None and entry.adapter else catalogue.TURBO_ADAPTER
    return settings.adapter_dir / adapter.filename
