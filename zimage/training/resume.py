"""Save a run's full state into a checkpoint and put it back, so a resumed run continues exactly.

What makes the resumed loss sequence equal to an uninterrupted one: the trained weights (fp32), the
optimizer and LR-scheduler states, the data-order position (BucketBatchSampler), the global RNG states
(LoRA dropout), and the trainer drawing noise, timesteps and caption dropout from generators that are
re-seeded from (seed, rank, step) at every step (`step_seed`), so they need no saved state at all and
every data-parallel rank resumes from rank 0's checkpoint alone.

accelerate's save_state / load_state are not used: they write the model in their own layout (and pickle
the rest), while a checkpoint here keeps the LoRA in its final, loadable format (lora.safetensors, the
file diffusers and ComfyUI read) and a weights_only resume state beside it (checkpoints.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from zimage.training import checkpoints, lora_io
from zimage.training.checkpoints import Checkpoint, CheckpointError, DamagedCheckpoint
from zimage.training.model_setup import ADAPTER_NAME

STATE_FORMAT = 1
TEXT_ENCODER_FILE = "text_encoder_lora.safetensors"  # in a checkpoint of a train_text_encoder run


def step_seed(seed: int, rank: int, step: int, stream: str) -> int:
    """A 63-bit seed for one random stream at one step of one rank (stable across Python runs)."""
    digest = hashlib.blake2b(f"{seed}:{rank}:{step}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def write_weights(folder: Path, model, training_type: str, lora_alpha: float, metadata: dict[str, str],
                  text_lora=None, text_encoder=None) -> None:  # fmt: skip
    """The weights of a checkpoint into `folder`: the LoRA file (or a transformer folder for a full
    fine-tune) and the text encoder LoRA when it trains. `model` and `text_encoder` are unwrapped."""
    if training_type == "finetune":
        model.save_pretrained(folder / checkpoints.TRANSFORMER_DIR, safe_serialization=True)
        return
    # fp32 whatever save_dtype says: the resumed run must start from exactly these weights.
    modules = lora_io.peft_modules(model, ADAPTER_NAME, lora_alpha)
    lora_io.save_lora(folder / checkpoints.LORA_FILE, modules, metadata, dtype=torch.float32)
    if text_lora is not None:
        text_lora.save(text_encoder, folder / TEXT_ENCODER_FILE, {}, torch.float32, overwrite=False)


def save_checkpoint(
    checkpoints_dir: Path, *, step: int, losses: list[float], training_type: str, optimizer, lr_scheduler, sampler,
    num_processes: int, write: Callable[[Path], None], reason: str = "", keep_last: int = 0, extra: dict | None = None,
) -> Checkpoint:  # fmt: skip
    """Write checkpoint `step` (main process only; the caller synchronises). `write(folder)` writes the
    weights (see write_weights); the rest is the resume state. `extra` goes into progress.json (val_loss)."""
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "training_type": training_type,
        "num_processes": num_processes,
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": checkpoints.rng_state(),
        "losses": torch.tensor(losses, dtype=torch.float64),
    }
    progress = {**sampler.state_dict(), "reason": reason, "training_type": training_type, **(extra or {})}
    return checkpoints.write_checkpoint(checkpoints_dir, step, write, state, progress, keep_last=keep_last)


def _load_lora(model, ckpt: Checkpoint) -> None:
    """The checkpoint's LoRA into the model's adapter, through peft, after checking that it fits."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    wanted = {k: v.shape for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}
    try:
        saved = lora_io.peft_state(lora_io.read_lora(ckpt.lora_path).modules)
    except Exception as exc:  # a truncated or garbled file: safetensors, OSError or our own format checks
        raise DamagedCheckpoint(f"{ckpt.lora_path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    for key, tensor in saved.items():
        if wanted.get(key) != tensor.shape:
            raise CheckpointError(
                f"{ckpt.path}: its LoRA does not fit this config ({key} {tuple(tensor.shape)}); "
                "lora_rank or the target modules changed since it was saved"
            )
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise CheckpointError(f"{ckpt.path}: its LoRA lacks {len(missing)} trained weight(s), e.g. {missing[:3]}")
    set_peft_model_state_dict(model, saved, adapter_name=ADAPTER_NAME)


def _load_transformer(model, ckpt: Checkpoint) -> None:
    from diffusers import ZImageTransformer2DModel

    saved = ZImageTransformer2DModel.from_pretrained(
        ckpt.transformer_dir, torch_dtype=torch.float32, use_safetensors=True
    )
    model.load_state_dict(saved.state_dict())  # copies into the trained (and prepared) tensors in place
    del saved


def restore(
    ckpt: Checkpoint, *, training_type: str, model, optimizer, lr_scheduler, sampler, num_processes: int,
    text_lora=None, text_encoder=None, log: Callable[[str], None] = lambda _m: None,
) -> tuple[int, list[float]]:  # fmt: skip
    """Load checkpoint `ckpt` into a set-up run (every process); returns (step it continues after, losses).

    `model` and `text_encoder` are unwrapped; optimizer and scheduler are the prepared ones. Every file is read
    before anything is loaded into the run where it can be, so a DamagedCheckpoint leaves the run as set up."""
    state = ckpt.load_state()
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{ckpt.path}: resume state format {state.get('format')} is not {STATE_FORMAT}")
    if state.get("training_type") != training_type:
        raise CheckpointError(f"{ckpt.path}: saved by a {state.get('training_type')} run, not {training_type}")
    if training_type == "finetune":
        _load_transformer(model, ckpt)
    else:
        _load_lora(model, ckpt)
    if text_lora is not None:
        if not (ckpt.path / TEXT_ENCODER_FILE).is_file():
            raise CheckpointError(f"{ckpt.path}: has no text encoder LoRA, but this run trains the text encoder")
        text_lora.load(text_encoder, ckpt.path / TEXT_ENCODER_FILE)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    sampler.load_state_dict(state["sampler"])
    checkpoints.set_rng_state(state["rng"])
    if int(state.get("num_processes", 1)) != num_processes:
        log(
            f"Note: the checkpoint was written by {state.get('num_processes')} process(es), this run has "
            f"{num_processes}; data order and LR schedule continue approximately"
        )
    return int(state["step"]), [float(x) for x in state["losses"].tolist()]


def restore_complete(
    ckpt: Checkpoint, *, fallback: bool = True, log: Callable[[str], None] = lambda _m: None, **parts
) -> tuple[Checkpoint, int, list[float]]:
    """`restore` from `ckpt`, or (with `fallback`) the newest older complete checkpoint if `ckpt` is damaged.

    Every damaged checkpoint newer than the one used is named in `log` with its full path and why; returns
    (the checkpoint used, step, losses). With no usable one left, the last DamagedCheckpoint is raised."""
    good, damaged = checkpoints.resumable_checkpoints(ckpt.path.parent)
    for bad, why in damaged:
        if bad.step > ckpt.step:
            log(f"Skipped checkpoint {bad.path}: {why}")
    candidates = [ckpt, *([c for c in good if c.step < ckpt.step] if fallback else [])]
    for n, candidate in enumerate(candidates, 1):
        try:
            step, losses = restore(candidate, log=log, **parts)
        except DamagedCheckpoint as exc:
            if n == len(candidates):
                raise
            log(f"Skipped checkpoint {candidate.path}: {exc}")
            continue
        return candidate, step, losses
    raise AssertionError("unreachable: the loop returns or raises")
