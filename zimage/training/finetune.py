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
import os
import shutil
from pathlib import Path

from zimage.training import lora_io

METADATA_FILE = "zimage_finetune.json"
MAX_SHARD_SIZE = "5GB"


def _free_name(path: Path) -> Path:
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")


def save_finetuned(trainer) -> Path | None:
    """Write the fine-tuned transformer (main process only); returns the folder."""
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return None
    c = trainer.config
    target = Path(trainer.resolved.output_path)
    if target.exists() and not c.overwrite:
        other = _free_name(target)
        trainer.report.log(f"{target.name} appeared while training; saving as {other.name} instead")
        target = other
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.transformer)
    try:
        # The run is over: cast in place to the configured dtype instead of holding a second copy.
        model.to(lora_io.DTYPES[c.save_dtype])
        model.save_pretrained(tmp / "transformer", safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        (tmp / METADATA_FILE).write_text(json.dumps(trainer.metadata(), indent=2, sort_keys=True) + "\n")
        if target.exists():  # overwrite: move the old one aside first, so a crash leaves one of them whole
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trainer.output_path = target
    trainer.report.log(f"Saved the fine-tuned transformer (step {trainer.step}) to {target}")
    return target
