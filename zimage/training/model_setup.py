"""The transformer a run trains: a peft LoRA on the frozen (optionally quantized) base, or every weight.

- LoRA: the base is loaded in the mixed-precision dtype (or quantized by bitsandbytes, 8-bit or NF4,
  on CUDA), frozen, the Turbo training adapter merged at +1.0 when configured, and the user's LoRA added
  as peft adapter "default" with fp32 weights. Trainable parameters are chosen by adapter name.
- Full fine-tune (De-Turbo only, enforced by validation): every transformer weight trains, kept in fp32
  under bf16 / fp16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from zimage.training import zimage_math
from zimage.training.adapter import trainable_by_adapter

ADAPTER_NAME = "default"  # the user's LoRA inside the peft-wrapped transformer


def target_regex(blocks: list[str], modules: list[str]) -> str:
    """A peft target_modules regex (full match) for `modules` inside the `blocks` groups."""
    inner = "|".join(m.replace(".", r"\.") for m in modules)
    return rf"^({'|'.join(blocks)})\.\d+\.({inner})$"


def _finish(transformer, config) -> None:
    from diffusers.training_utils import cast_training_params

    if config.mixed_precision != "no":
        cast_training_params(transformer, dtype=torch.float32)  # trainable weights stay fp32
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()


def trainable_transformer(
    config, model_dir: Path, adapter_path: Path | None, device: torch.device, weight_dtype: torch.dtype,
    log: Callable[[str], None] = lambda _m: None,
):  # fmt: skip
    """(transformer on `device`, its trainable parameters) for `config` (a TrainingConfig)."""
    c = config
    if c.training_type == "finetune":
        transformer = zimage_math.load_transformer(model_dir, dtype=weight_dtype).to(device)
        transformer.requires_grad_(True)
        _finish(transformer, c)
        params = list(transformer.parameters())
        log(f"Full fine-tune: {sum(p.numel() for p in params):,} trainable parameters")
        return transformer, params

    from peft import LoraConfig

    transformer = zimage_math.load_transformer(model_dir, dtype=weight_dtype, quantize=c.quantize)
    transformer.requires_grad_(False)
    if c.quantize:
        log(f"Loaded the transformer quantized ({'NF4' if c.quantize == 'nf4' else '8-bit'})")
    if adapter_path is not None:
        from zimage.training.adapter import merge_adapter

        merge_adapter(transformer, adapter_path)
        log(f"Merged the training adapter {adapter_path.name} at +1.0")
    lora_config = LoraConfig(
        r=c.lora_rank,
        lora_alpha=c.lora_alpha,
        lora_dropout=c.lora_dropout,
        init_lora_weights=True,
        target_modules=target_regex(c.lora_target_blocks, c.lora_target_modules),
    )
    transformer.add_adapter(lora_config, adapter_name=ADAPTER_NAME)
    if not c.quantize:  # bitsandbytes already placed a quantized model on the GPU (and refuses .to())
        transformer.to(device)
    _finish(transformer, c)
    # By adapter name, not requires_grad: other loaded adapters may come back trainable.
    params = trainable_by_adapter(transformer, ADAPTER_NAME)
    count = sum(p.numel() for p in params)
    log(f"LoRA rank {c.lora_rank}, alpha {c.lora_alpha:g}: {count:,} trainable parameters")
    return transformer, params
