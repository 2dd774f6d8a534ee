"""Shipped presets: partial flat configs laid over the TrainingConfig defaults.

A preset never names a dataset; the user (or the Train page) adds dataset_path and usually model_path.
Each one is loaded and validated by tests/test_config.py.
"""

from __future__ import annotations

from typing import Any

from zimage.errors import UserError

PRESETS: dict[str, dict[str, Any]] = {
    # A fast smoke run: small images, a small LoRA, no checkpoints; samples before and at the end only,
    # so a first run shows what it did (sample_every_n_steps = num_steps: the end sample comes with any length).
    "quick_test": {
        "resolution": 512,
        "lora_rank": 8,
        "lora_alpha": 8,
        "learning_rate": 2e-4,
        "num_steps": 100,
        "gradient_accumulation": 1,
        "lr_scheduler": "constant",
        "save_every_n_steps": 0,
        "sample_every_n_steps": 100,
        "output_name": "quick_test",
    },
    # A person or a character: identity needs capacity and a trigger word in every caption.
    "character_lora": {
        "resolution": 1024,
        "lora_rank": 32,
        "lora_alpha": 32,
        "learning_rate": 1e-4,
        "num_steps": 1500,
        "gradient_accumulation": 1,
        "caption_dropout": 0.05,
        "lr_warmup_steps": 50,
        "output_name": "character_lora",
    },
    # A look applied to anything: more dropout so the style is not tied to the caption words.
    "style_lora": {
        "resolution": 1024,
        "lora_rank": 32,
        "lora_alpha": 16,
        "learning_rate": 1e-4,
        "num_steps": 2000,
        "gradient_accumulation": 1,
        "caption_dropout": 0.1,
        "lr_warmup_steps": 100,
        "output_name": "style_lora",
    },
    # An object or idea: a smaller LoRA is enough.
    "concept_lora": {
        "resolution": 1024,
        "lora_rank": 16,
        "lora_alpha": 16,
        "learning_rate": 1e-4,
        "num_steps": 1500,
        "gradient_accumulation": 1,
        "caption_dropout": 0.05,
        "lr_warmup_steps": 50,
        "output_name": "concept_lora",
    },
    # Every transformer weight, on De-Turbo only (DESIGN.md section 3); low learning rate.
    "full_finetune": {
        "training_type": "finetune",
        "model_path": "z-image-de-turbo",
        "resolution": 1024,
        "learning_rate": 1e-5,
        "num_steps": 3000,
        "gradient_accumulation": 4,
        "optimizer": "adamw8bit",
        "lr_warmup_steps": 100,
        "output_name": "full_finetune",
    },
}

# Base-model variants (DESIGN.md section 4: Z-Image base is what the public trainers recommend for LoRAs
# and fine-tunes; no adapter, and its LoRAs also load on Turbo). Sampling steps, CFG and the negative prompt
# follow the model; what differs is the model and a validation loss on a tenth of the images held out, so
# runs of a sweep can be compared by one number (and the best checkpoint exported).
_BASE = {"model_path": "z-image", "validation_images": "0.1", "validation_every_n_steps": 100}
PRESETS["character_lora_base"] = {**PRESETS["character_lora"], **_BASE, "output_name": "character_lora_base"}
PRESETS["style_lora_base"] = {**PRESETS["style_lora"], **_BASE, "output_name": "style_lora_base"}
PRESETS["full_finetune_base"] = {**PRESETS["full_finetune"], **_BASE, "output_name": "full_finetune_base"}
PRESET_NOTES = {
    name: "Z-Image base: recommended for training; also loads on Turbo" for name in PRESETS if name.endswith("_base")
}


def preset(name: str) -> dict[str, Any]:
    """A copy of the preset's flat fields; an unknown name lists the shipped ones."""
    if name not in PRESETS:
        raise UserError(f"preset {name!r} does not exist; choose one of: {', '.join(PRESETS)}")
    return {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[name].items()}
