"""Exporting a checkpoint's LoRA as a finished file: the best one by validation loss, the newest, or one by name.

`zimage runs export RUN --checkpoint best` copies the LoRA of the complete checkpoint with the lowest
val_loss (recorded in its progress.json when the run measured one at that step) to models/loras/trained/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from zimage.fsio import atomic_path
from zimage.records import Damaged
from zimage.run_records import read_progress
from zimage.training.checkpoints import (
    PROGRESS_FILE,
    Checkpoint,
    CheckpointError,
    find_checkpoint,
    newest_checkpoint,
    resumable_checkpoints,
)

CHOICES = ("best", "newest")  # or a checkpoint name (step-000040, or 40)


def checkpoint_val_loss(ckpt: Checkpoint) -> float | None:
    """The val_loss a checkpoint recorded (None: not measured at its step, or no readable progress.json)."""
    progress = read_progress(ckpt.path / PROGRESS_FILE)
    return None if isinstance(progress, Damaged) else progress.val_loss


def best_checkpoint(checkpoints_dir: Path) -> tuple[Checkpoint, float] | None:
    """(the complete checkpoint with the lowest val_loss, its val_loss); the earlier step on a tie."""
    good, _damaged = resumable_checkpoints(Path(checkpoints_dir))
    scored = [(v, c.step, c) for c in good if (v := checkpoint_val_loss(c)) is not None]
    if not scored:
        return None
    value, _step, ckpt = min(scored, key=lambda t: (t[0], t[1]))
    return ckpt, value


def pick_checkpoint(checkpoints_dir: Path, which: str) -> Checkpoint:
    """`which` = best | newest | a checkpoint name; a CheckpointError says why none fits."""
    checkpoints_dir = Path(checkpoints_dir)
    if which == "best":
        best = best_checkpoint(checkpoints_dir)
        if best is None:
            raise CheckpointError(
                f"--checkpoint best: no complete checkpoint in {checkpoints_dir} recorded a val_loss (set "
                "validation_images, and save_every_n_steps so checkpoints are written where it is measured)"
            )
        return best[0]
    if which == "newest":
        ckpt = newest_checkpoint(checkpoints_dir)
        if ckpt is None:
            raise CheckpointError(f"--checkpoint newest: no complete checkpoint in {checkpoints_dir}")
        return ckpt
    return find_checkpoint(checkpoints_dir, which)


def export_lora(ckpt: Checkpoint, target: Path, overwrite: bool = False) -> Path:
    """Copy the checkpoint's LoRA file to `target` (atomic; an existing file only with `overwrite`)."""
    if not ckpt.lora_path.is_file():
        raise CheckpointError(f"{ckpt.path.name} has no {ckpt.lora_path.name} (a full fine-tune checkpoint?)")
    if Path(target).exists() and not overwrite:
        raise CheckpointError(f"{target} already exists; choose another --name or pass --overwrite")
    with atomic_path(Path(target), overwrite=overwrite) as tmp:
        shutil.copyfile(ckpt.lora_path, tmp)
    return Path(target)
