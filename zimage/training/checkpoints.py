"""Checkpoints in a run folder: weights in their final format plus a separate resume state.

    checkpoints/step-000120/
        lora.safetensors      the LoRA as far as trained (the format `zimage` writes; diffusers and
                              ComfyUI load it), fp32 so that a resume continues bit for bit
        transformer/          instead of lora.safetensors for a full fine-tune (diffusers folder)
        resume_state.pt       optimizer, LR scheduler, RNG states, step, data-order position
                              (torch.save of plain tensors / numbers; read with weights_only=True)
        progress.json         {"step", "epoch", "position", "saved", "complete": true}
        manifest.json         {"format": 1, "step", "files": [{"path", "size", "sha256"}, ...]}: every other
                              file's relative path, size and SHA-256; written last

A checkpoint is complete when its manifest matches the files (`verify`); one written before manifests
existed is complete when progress.json says `complete: true` and its resume state and weights load.
`newest_checkpoint` returns the newest complete one, `checkpoint_report` says why each other one is not.

A checkpoint is built in a hidden `checkpoints/.tmp-step-NNNNNN-*/` folder and renamed into place
(fsio.atomic_folder), so a kill during a save leaves only a hidden temp folder (removed by the next
save) and the previous checkpoint intact.
Readers (the registry, `newest_checkpoint`) ignore names that start with a dot.
"""

from __future__ import annotations

import hashlib
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
from zimage.records import Damaged

PREFIX = "step-"
LORA_FILE = "lora.safetensors"
TRANSFORMER_DIR = "transformer"
STATE_FILE = "resume_state.pt"
PROGRESS_FILE = "progress.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
HASH_CHUNK = 2**20  # 1 MiB reads: a multi-GB transformer folder hashes without holding it in memory


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
        """The resume state; weights_only=True: our own file, but never unpickle arbitrary objects.

        A damaged file raises DamagedCheckpoint naming it (torch says only "[Errno 22] Invalid argument")."""
        path = self.path / STATE_FILE
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch.load raises RuntimeError, UnpicklingError, OSError, EOFError ...
            raise DamagedCheckpoint(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc


class DamagedCheckpoint(CheckpointError):
    """A checkpoint file that is truncated, garbled or missing; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def is_complete(folder: Path) -> bool:
    """A finished checkpoint: progress.json (written last) says so and the resume state is there."""
    from zimage.run_records import read_progress

    progress = read_progress(folder / PROGRESS_FILE)  # a damaged or non-object progress.json: not complete
    if isinstance(progress, Damaged) or not progress.complete:
        return False
    weights = (folder / LORA_FILE).is_file() or (folder / TRANSFORMER_DIR).is_dir()
    return (folder / STATE_FILE).is_file() and weights


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """manifest.json over every other file in `folder` (call it last, once everything else is written)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    entries = [
        {"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p)} for p in files
    ]
    record = {"format": MANIFEST_FORMAT, "step": step, "files": entries}
    (folder / MANIFEST_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def _check_manifest(folder: Path) -> str | None:
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        entries = [(str(e["path"]), int(e["size"]), str(e["sha256"])) for e in manifest["files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{folder / MANIFEST_FILE}: cannot be read ({exc})"
    for rel, size, sha in entries:
        path = folder / rel
        if not path.is_file():
            return f"{path}: missing (listed in {MANIFEST_FILE})"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, the manifest says {size}"
        if _sha256(path) != sha:
            return f"{path}: its SHA-256 does not match the manifest (the file changed after it was saved)"
    return None


def _check_legacy(folder: Path) -> str | None:
    """A checkpoint from before manifests: the old rule, plus its resume state and LoRA must load."""
    if not is_complete(folder):
        return f"{folder}: not complete ({PROGRESS_FILE} lacks complete: true, or a file is missing)"
    try:
        Checkpoint(folder, 0).load_state()
    except DamagedCheckpoint as exc:
        return str(exc)
    if (folder / LORA_FILE).is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(folder / LORA_FILE), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            return f"{folder / LORA_FILE}: cannot be read ({exc})"
    return None


def verify(folder: Path) -> str | None:
    """Why checkpoint `folder` cannot be resumed from (naming the file), or None when it is complete."""
    folder = Path(folder)
    if (folder / MANIFEST_FILE).exists():
        return _check_manifest(folder)
    return _check_legacy(folder)


def _step_folders(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not Path(checkpoints_dir).is_dir():
        return []
    out = []
    for entry in Path(checkpoints_dir).iterdir():
        digits = entry.name[len(PREFIX) :]
        if entry.name.startswith(PREFIX) and digits.isdigit() and entry.is_dir():
            out.append((int(digits), entry))
    return sorted(out)


def checkpoint_report(checkpoints_dir: Path) -> list[tuple[str, int, bool, str]]:
    """(name, step, ok, problem) for every checkpoint folder, oldest first; problem is "" when ok.

    For `zimage runs show` and the Runs page: which checkpoints a resume can use, and why not the others."""
    report = []
    for step, folder in _step_folders(checkpoints_dir):
        problem = verify(folder)
        report.append((folder.name, step, problem is None, problem or ""))
    return report


def resumable_checkpoints(checkpoints_dir: Path) -> tuple[list[Checkpoint], list[tuple[Checkpoint, str]]]:
    """(complete checkpoints newest first, (checkpoint, why) for each damaged one newest first), verified."""
    good, skipped = [], []
    for step, folder in reversed(_step_folders(checkpoints_dir)):
        problem = verify(folder)
        if problem is None:
            good.append(Checkpoint(folder, step))
        else:
            skipped.append((Checkpoint(folder, step), problem))
    return good, skipped


def find_checkpoint(checkpoints_dir: Path, name: str) -> Checkpoint:
    """The checkpoint `name` (step-000040, or just 40) if it is complete, else a CheckpointError saying why."""
    digits = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    if not digits.isdigit():
        raise CheckpointError(f"--checkpoint {name!r}: expected a name like {checkpoint_name(40)}")
    folder = Path(checkpoints_dir) / checkpoint_name(int(digits))
    if not folder.is_dir():
        names = ", ".join(n for n, *_ in checkpoint_report(checkpoints_dir)) or "none"
        raise CheckpointError(f"--checkpoint {name}: no such checkpoint in {checkpoints_dir} (there: {names})")
    problem = verify(folder)
    if problem:
        raise DamagedCheckpoint(f"--checkpoint {name} is damaged: {problem}; choose another or resume without it")
    return Checkpoint(folder, int(digits))


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
    """The newest checkpoint that `verify` finds complete (damaged newer ones are passed over)."""
    good, _skipped = resumable_checkpoints(checkpoints_dir)
    return good[0] if good else None


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
        write_manifest(tmp, step)  # last: a checkpoint whose manifest matches is complete
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
