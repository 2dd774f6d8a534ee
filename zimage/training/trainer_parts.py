"""Pieces of the training recipe that trainer.py calls in one line each, so the recipe stays readable:
the divergence check, the text encoder LoRA of a config, the run's image sampler."""

from __future__ import annotations

import math
from collections.abc import Callable

from zimage.errors import UserError


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message says at which step and what to change."""


def check_finite(loss: float, step: int, config) -> None:
    """Raise TrainingDiverged when `loss` (of `step`) is NaN or infinite, saying what to change."""
    if not math.isfinite(loss):
        c = config
        raise TrainingDiverged(
            f"The loss became {loss} at step {step}: training diverged. Lower learning_rate "
            f"(now {c.learning_rate:g}), keep max_grad_norm on (now {c.max_grad_norm:g}), or use "
            "mixed_precision bf16 instead of fp16."
        )


def text_encoder_lora(config, model_dir, device, dtype, log: Callable[[str], None]):
    """The TextEncoderLora of a train_text_encoder config (text_lora.py)."""
    from zimage.training.text_lora import TextEncoderLora

    c = config
    lora = TextEncoderLora(
        model_dir, device, dtype, rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
        gradient_checkpointing=c.gradient_checkpointing, fp32_weights=c.mixed_precision != "no",
    )  # fmt: skip
    count = sum(p.numel() for p in lora.params)
    log(f"Text encoder LoRA: {count:,} trainable parameters (embeddings computed every step)")
    return lora


def image_sampler(config, resolved, device, dtype, embed, *, fixed: bool, fallback: str, autocast, run, log):
    """The run's sampling.TrainingSampler: its settings from the config, the adapter reversed for a LoRA."""
    from zimage.training.sampling import SampleSettings, TrainingSampler

    return TrainingSampler(
        SampleSettings.from_config(config, fallback), resolved.model_dir, device, dtype, embed,
        fixed_embeddings=fixed, adapter_path=resolved.adapter_path if config.training_type == "lora" else None,
        autocast=autocast, run=run, log=log,
    )  # fmt: skip


def step_record(step: int, loss: float, lr: float, grad_norm: float, step_time: float, per_step: int,
                elapsed: float, first_step: int, num_steps: int) -> dict:  # fmt: skip
    """The metrics line of one optimizer step (DESIGN.md metric fields; memory is added when it is logged)."""
    return {
        "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
        "step_time": step_time, "samples_per_s": per_step / step_time if step_time > 0 else None,
        "elapsed": elapsed, "eta": elapsed / (step - first_step) * (num_steps - step),
    }  # fmt: skip


def training_captions(config, training_set) -> list[str]:
    """The captions whose embeddings a run caches: every item's, the empty one for caption dropout, none
    while the text encoder trains (its embeddings change every step)."""
    if config.train_text_encoder:
        return []
    return [it.caption for it in training_set.items] + ([""] if config.caption_dropout > 0 else [])


def run_metadata(config, resolved, training_set, step: int) -> dict[str, str]:
    """The metadata a LoRA file of this run carries (lora_io.training_metadata)."""
    from zimage.training import lora_io

    r, ts = resolved, training_set
    name, adapter = r.dataset_info.name or r.dataset_dir.name, r.adapter_path.name if r.adapter_path else ""
    return lora_io.training_metadata(config, steps=step, dataset_name=name, dataset_hash=ts.content_hash,
                                     num_images=len(ts.items), adapter_name=adapter)  # fmt: skip
