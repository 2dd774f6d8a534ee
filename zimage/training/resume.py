"""Save a trainer's full state into a checkpoint and put it back, so a resumed run continues exactly.

What makes the resumed loss sequence equal to an uninterrupted one: the trained weights (fp32), the
optimizer and LR-scheduler states, the data-order position (BucketBatchSampler), the global RNG states
(LoRA dropout), and the trainer drawing noise, timesteps and caption dropout from generators that are
re-seeded from (seed, rank, step) at every step (`step_seed`), so they need no saved state at all and
every data-parallel rank resumes from rank 0's checkpoint alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from zimage.training import checkpoints, lora_io
from zimage.training.checkpoints import Checkpoint, CheckpointError

STATE_FORMAT = 1
TEXT_ENCODER_FILE = "text_encoder_lora.safetensors"  # in a checkpoint of a train_text_encoder run


def step_seed(seed: int, rank: int, step: int, stream: str) -> int:
    """A 63-bit seed for one random stream at one step of one rank (stable across Python runs)."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _write_weights(trainer, folder: Path) -> None:
    model = trainer.accelerator.unwrap_model(trainer.transformer)
    if trainer.config.training_type == "finetune":
        model.save_pretrained(folder / checkpoints.TRANSFORMER_DIR, safe_serialization=True)
        return
    # fp32 whatever save_dtype says: the resumed run must start from exactly these weights.
    lora_io.save_lora(folder / checkpoints.LORA_FILE, trainer.lora_modules(), trainer.metadata(), dtype=torch.float32)
    if trainer.text_lora is not None:
        encoder = trainer.accelerator.unwrap_model(trainer.text_encoder)
        trainer.text_lora.save(encoder, folder / TEXT_ENCODER_FILE, {}, torch.float32, overwrite=False)


def save_checkpoint(trainer, checkpoints_dir: Path, reason: str = "") -> Checkpoint:
    """Write the trainer's state at its current step (main process only; the caller synchronises)."""
    c = trainer.config
    state = {
        "format": STATE_FORMAT,
        "step": trainer.step,
        "training_type": c.training_type,
        "num_processes": trainer.accelerator.num_processes,
        "optimizer": trainer.optimizer.state_dict(),
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "sampler": trainer.sampler.state_dict(),
        "rng": checkpoints.rng_state(),
        "losses": torch.tensor(trainer.losses, dtype=torch.float64),
    }
    progress = {**trainer.sampler.state_dict(), "reason": reason, "training_type": c.training_type}
    return checkpoints.write_checkpoint(
        checkpoints_dir, trainer.step, lambda folder: _write_weights(trainer, folder), state, progress,
        keep_last=c.keep_last_n_checkpoints,
    )  # fmt: skip


def _load_lora(trainer, ckpt: Checkpoint) -> None:
    from zimage.training.model_setup import ADAPTER_NAME

    model = trainer.accelerator.unwrap_model(trainer.transformer)
    params = dict(model.named_parameters())
    lora = lora_io.read_lora(ckpt.lora_path)
    wanted = {n for n in params if f".{ADAPTER_NAME}." in n and "lora_" in n}
    seen = set()
    with torch.no_grad():
        for path, module in lora.modules.items():
            for part, tensor in (("lora_A", module.down), ("lora_B", module.up)):
                name = f"{path}.{part}.{ADAPTER_NAME}.weight"
                if name not in params or params[name].shape != tensor.shape:
                    raise CheckpointError(
                        f"{ckpt.path}: its LoRA does not fit this config ({path} {part} {tuple(tensor.shape)}); "
                        "lora_rank or the target modules changed since it was saved"
                    )
                params[name].copy_(tensor)
                seen.add(name)
    if seen != wanted:
        missing = sorted(wanted - seen)[:3]
        raise CheckpointError(f"{ckpt.path}: its LoRA lacks {len(wanted - seen)} trained weight(s), e.g. {missing}")


def _load_transformer(trainer, ckpt: Checkpoint) -> None:
    from diffusers import ZImageTransformer2DModel

    model = trainer.accelerator.unwrap_model(trainer.transformer)
    saved = ZImageTransformer2DModel.from_pretrained(ckpt.transformer_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.state_dict().items():
            param.copy_(saved.state_dict()[name])
    del saved


def restore(trainer, ckpt: Checkpoint) -> int:
    """Load checkpoint `ckpt` into a set-up trainer (every process); returns the step it continues after."""
    state = ckpt.load_state()
    c = trainer.config
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{ckpt.path}: resume state format {state.get('format')} is not {STATE_FORMAT}")
    if state.get("training_type") != c.training_type:
        raise CheckpointError(f"{ckpt.path}: saved by a {state.get('training_type')} run, not {c.training_type}")
    if c.training_type == "finetune":
        _load_transformer(trainer, ckpt)
    else:
        _load_lora(trainer, ckpt)
    if trainer.text_lora is not None:
        if not (ckpt.path / TEXT_ENCODER_FILE).is_file():
            raise CheckpointError(f"{ckpt.path}: has no text encoder LoRA, but this run trains the text encoder")
        trainer.text_lora.load(trainer.accelerator.unwrap_model(trainer.text_encoder), ckpt.path / TEXT_ENCODER_FILE)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.sampler.load_state_dict(state["sampler"])
    checkpoints.set_rng_state(state["rng"])
    trainer.step = int(state["step"])
    trainer.losses = [float(x) for x in state["losses"].tolist()]
    if int(state.get("num_processes", 1)) != trainer.accelerator.num_processes:
        trainer.report.log(
            f"Note: the checkpoint was written by {state.get('num_processes')} process(es), this run has "
            f"{trainer.accelerator.num_processes}; data order and LR schedule continue approximately"
        )
    return trainer.step
