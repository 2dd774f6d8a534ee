"""The output of a full fine-tune: a diffusers transformer folder under models/finetuned/<name>/.

    models/finetuned/<name>/
        transformer/            config.json + (sharded) diffusion_pytorch_model*.safetensors
        zimage_finetune.json    base model, steps, dataset name + hash, the training config, software

It loads back as `ZImagePipeline.from_pretrained(base, transformer=ZImageTransformer2DModel.from_pretrained(
"models/finetuned/<name>/transformer"))` (DESIGN.md section 4). Written into a hidden temp folder and
renamed into place; an existing folder is never replaced unless the config says overwrite.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from zimage.fsio import atomic_folder

METADATA_FILE = "zimage_finetune.json"
MAX_SHARD_SIZE = "5GB"


def _free_name(path: Path) -> Path:
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def save_finetuned(model, target: Path, metadata: dict[str, str], dtype: torch.dtype, overwrite: bool,
                   log: Callable[[str], None] = lambda _m: None) -> Path:  # fmt: skip
    """Write the fine-tuned transformer `model` (unwrapped) as `target`; returns the folder written.

    A folder that appeared at `target` since validation is kept (the result goes to `<name>-N`) unless
    `overwrite`. Casts `model` in place to `dtype`: the run is over, and a second copy would double memory.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        other = _free_name(target)
        log(f"{target.name} appeared while training; saving as {other.name} instead")
        target = other
    with atomic_folder(target, overwrite=overwrite) as tmp:
        model.to(dtype)
        model.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return target
