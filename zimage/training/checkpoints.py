"""Checkpoints in a run folder: weights in their final format plus a separate resume state.

    checkpoints/step-000120/
        lora.safetensors      the LoRA as far as trained (the format `zimage` writes; diffusers and
                              ComfyUI load it), fp32 so that a resume continues bit for bit
        transformer/          instead of lora.safetensors for a full fine-tune (diffusers folder)
        resume_state.pt       optimizer, LR scheduler, RNG states, step, data-order position
                              (torch.save of plain tensors / numbers; read with weights_only=True)
        progress.json         {"step", "epoch", "position", "saved", "complete": true}; written last

A checkpoint is built in a hidden `checkpoints/.tmp-step-NNNNNN-*/` folder and renamed into place
(fsio.atomic_folder), so a kill during a save leaves only a hidden temp folder (removed by the next
save) and the previous checkpoint intact.
Readers (the registry, `newest_checkpoint`) ignore names that start with a dot.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zimage.errors import UserError
from zimage.fsio import atomic_folder

PREFIX = "step-"
LORA_FILE = "lora.safetensors"
TRANSFORMER_DIR = "transformer"
STATE_FILE = "resume_state.pt"
PROGRESS_FILE = "progress.json"


class CheckpointError(UserError):
    """A run that cannot be resumed: no complete checkpoint, or one that does not match the config."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def lora_path(self) -> Path:
        return self.path / LORA_FILE

    @property
    def transformer_dir(self) -> Path:
        return self.path / TRANSFORMER_DIR

    def load_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The resume state; weights_only=True: our own file, but never unpickle arbitrary objects."""
        return torch.load(self.path / STATE_FILE, map_location=map_location, weights_only=True)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def is_complete(folder: Path) -> bool:
    """A finished checkpoint: progress.json (written last) says so and the resume state is there."""
    try:
        progress = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    weights = (folder / LORA_FILE).is_file() or (folder / TRANSFORMER_DIR).is_dir()
    return bool(progress.get("complete")) and (folder / STATE_FILE).is_file() and weights


def list_checkpoints(checkpoints_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest step first (temp folders and half-written ones are skipped)."""
    out = []
    if not Path(checkpoints_dir).is_dir():
        return out
    for entry in Path(checkpoints_dir).iterdir():
        if entry.name.startswith(".") or not entry.name.startswith(PREFIX) or not entry.is_dir():
            continue
        digits = entry.name[len(PREFIX) :]
        if digits.isdigit() and is_complete(entry):
            out.append(Checkpoint(entry, int(digits)))
    return sorted(out, key=lambda c: c.step)


def newest_checkpoint(checkpoints_dir: Path) -> Checkpoint | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def write_checkpoint(
    checkpoints_dir: Path,
    step: int,
    write_weights,
    state: dict[str, Any],
    progress: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Checkpoint:
    """Write checkpoint `step` atomically and prune to the newest `keep_last` (0: keep all).

    `write_weights(folder)` writes lora.safetensors or transformer/ into the temp folder.
    """
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    for stale in checkpoints_dir.glob(".tmp-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoints_dir / checkpoint_name(step)
    # overwrite: the same step saved twice (save-now right after a periodic save) replaces the first one.
    with atomic_folder(final, overwrite=True) as tmp:
        write_weights(tmp)
        torch.save(state, tmp / STATE_FILE)
        record = {"step": step, "saved": time.time(), **(progress or {}), "complete": True}
        (tmp / PROGRESS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if keep_last > 0:
        prune(checkpoints_dir, keep_last)
    return Checkpoint(final, step)


def prune(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; returns what was removed."""
    found = list_checkpoints(checkpoints_dir)
    removed = []
    for ckpt in found[: max(0, len(found) - keep_last)]:
        # Rename first, so a reader never sees a half-deleted checkpoint under its real name.
        doomed = ckpt.path.with_name(f".del-{ckpt.path.name}")
        try:
            os.rename(ckpt.path, doomed)
        except OSError:
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(ckpt.path)
    return removed


# -- RNG state ---------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's global RNG states in a form torch.load(weights_only=True) accepts."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
