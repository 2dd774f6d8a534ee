"""The result of a run: the LoRA file (and the text encoder's beside it) or the fine-tuned transformer.

A file or folder that appeared at the output path since validation is never replaced: the result goes
to `<name>-2` (then -3, ...) and the log says so (unless the config says overwrite).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from zimage.training import lora_io
from zimage.training.model_setup import ADAPTER_NAME


def save_lora_unclaimed(path: Path, modules: dict[str, lora_io.LoraModule], metadata: dict[str, str],
                        dtype: torch.dtype, overwrite: bool, log: Callable[[str], None] = lambda _m: None) -> Path:  # fmt: skip
    """lora_io.save_lora, but a file that appeared at `path` since validation is kept: the LoRA goes to `<name>-N`."""
    try:
        return lora_io.save_lora(path, modules, metadata, dtype=dtype, overwrite=overwrite)
    except FileExistsError:
        n = 2
        while path.with_name(f"{path.stem}-{n}{path.suffix}").exists():
            n += 1
        other = path.with_name(f"{path.stem}-{n}{path.suffix}")
        log(f"{path.name} appeared while training; saving as {other.name} instead")
        return lora_io.save_lora(other, modules, metadata, dtype=dtype, overwrite=False)


def save_output(config, model, path: Path, metadata: dict[str, str], *, text_lora=None, text_encoder=None,
                step: int = 0, log: Callable[[str], None] = lambda _m: None) -> Path:  # fmt: skip
    """Write the result of training `model` (unwrapped) with `config` (a TrainingConfig); returns its path."""
    c, dtype = config, lora_io.DTYPES[config.save_dtype]
    if c.training_type == "finetune":
        from zimage.training.finetune import save_finetuned

        path = save_finetuned(model, path, metadata, dtype, c.overwrite, log=log)
        log(f"Saved the fine-tuned transformer (step {step}) to {path}")
        return path
    modules = lora_io.peft_modules(model, ADAPTER_NAME, c.lora_alpha)
    path = save_lora_unclaimed(path, modules, metadata, dtype, c.overwrite, log=log)
    if text_lora is not None:  # the text encoder part goes beside it (see text_lora.py)
        from zimage.training.text_lora import text_encoder_lora_path

        te = text_lora.save(text_encoder, text_encoder_lora_path(path), metadata, dtype, overwrite=True)
        log(f"Saved the text encoder LoRA to {te}")
    log(f"Saved LoRA ({len(modules)} modules, step {step}) to {path}")
    return path
