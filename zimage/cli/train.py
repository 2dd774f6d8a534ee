"""`zimage train [CONFIG] [--run-dir DIR] [--preset NAME] [--set key=value ...]`: train a LoRA headless.

- With CONFIG (JSON/YAML) and no --run-dir: creates registry/runs/<YYYYMMDD-HHMMSS>-<output_name>/, writes
  the full config there as config.json and trains in it.
- With --run-dir DIR holding config.json (the job queue's way): trains from that file and never changes it.
- An invalid config exits 2 with every problem listed and starts no run (a folder this command created is
  removed again; a queue's folder gets status `failed` with the problems).
- `zimage train --resume RUN_DIR [--checkpoint step-000040]` continues a stopped, failed or lost run from
  its newest complete checkpoint (damaged ones are skipped and named), or the one given, with the run's own
  config.json (the queue's resume does the same: it launches
  `--run-dir DIR` with `resume: true` in status.json).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA from a config file or a run folder")
    p.add_argument("config", nargs="?", help="training config (.json / .yaml); optional with --run-dir")
    p.add_argument("--run-dir", help="run folder; its config.json is used when CONFIG is not given")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a stopped or interrupted run from its newest checkpoint"
    )
    p.add_argument("--checkpoint", metavar="NAME",
                   help="with --resume: continue from this checkpoint (e.g. step-000040) instead of the newest")  # fmt: skip
    p.add_argument("--preset", help="start from a preset: quick_test, character_lora, style_lora, concept_lora")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field (repeatable), e.g. --set lora_rank=16")  # fmt: skip
    p.set_defaults(handler=run)


def new_run_dir(runs_dir: Path, output_name: str) -> Path:
    """registry/runs/<timestamp>-<output_name>, created now; a suffix keeps two starts in one second apart."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{output_name}"
    for n in range(1, 1000):
        path = runs_dir / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {runs_dir}")


def run(args) -> int:
    from zimage.config import ConfigError, build_config, parse_override, read_config_file, validate_config
    from zimage.errors import UserError
    from zimage.runfolder import RunFolder
    from zimage.settings import get_settings
    from zimage.training.distributed import is_main_rank, world_size

    settings = get_settings()
    main = is_main_rank()  # under torchrun / accelerate launch only rank 0 writes the run folder
    if world_size() > 1 and not (args.run_dir or args.resume):
        raise UserError(
            "under torchrun / accelerate launch give --run-dir DIR, so that every process uses the same run folder"
        )
    if args.resume:
        if args.config or args.run_dir or args.preset or args.overrides:
            raise UserError(
                "--resume RUN_DIR uses the run's own config.json: give no CONFIG, --run-dir, --preset or --set"
            )
        return resume(Path(args.resume).expanduser().resolve(), settings, checkpoint_name=args.checkpoint)
    if args.checkpoint:
        raise UserError("--checkpoint NAME goes with --resume RUN_DIR")
    run_dir = Path(args.run_dir).expanduser().resolve() if args.run_dir else None
    queued = RunFolder(run_dir).read_status() if run_dir is not None and not args.config else {}
    if queued.get("resume"):  # the job queue's resume of a stopped / lost run, maybe from a chosen checkpoint
        return resume(run_dir, settings, checkpoint_name=queued.get("resume_checkpoint"))
    if args.config:
        raw = read_config_file(args.config)
        if main and run_dir is not None and RunFolder(run_dir).config_path.exists():
            raise UserError(f"{run_dir} already holds a config.json; give either CONFIG or --run-dir, not both")
    elif run_dir is not None:
        folder = RunFolder(run_dir)
        if not folder.config_path.exists():
            raise UserError(f"--run-dir {run_dir}: no config.json there (and no CONFIG given)")
        raw = read_config_file(folder.config_path)
    elif args.preset:
        raw = {}
    else:
        raise UserError("give a CONFIG file, a --run-dir holding config.json, or a --preset with --set fields")
    overrides = dict(parse_override(item) for item in args.overrides)

    queued_folder = run_dir is not None and not args.config
    try:
        config = build_config(raw, preset=args.preset, overrides=overrides)
        resolved = validate_config(config, settings)
    except ConfigError as exc:
        if queued_folder and main:  # the queue must see why its job never started
            RunFolder(run_dir).update_status(state="failed", error=str(exc), ended=time.time())
        raise

    from zimage.training.memory_fit import with_memory_warning

    resolved = with_memory_warning(resolved)  # logged by the trainer with the other warnings
    created = run_dir is None
    if run_dir is None:
        run_dir = new_run_dir(settings.runs_dir, resolved.config.output_name)
    folder = RunFolder(run_dir)
    try:
        if main and not folder.config_path.exists():
            folder.write_config(resolved.config.to_dict())
    except OSError:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if main:
        print(f"run folder: {run_dir}", flush=True)
    return _train_with_progress(resolved, settings, run_dir)


def resume(run_dir: Path, settings, checkpoint_name: str | None = None) -> int:
    """Continue the run in `run_dir` from its newest complete checkpoint, or the one named (its config.json
    is used unchanged). Damaged checkpoints are passed over and named; a damaged named one is an error."""
    from zimage.config import ConfigError, build_config, read_config_file, validate_config
    from zimage.errors import UserError
    from zimage.runfolder import ACTIVE_STATES, RunFolder
    from zimage.training.checkpoints import find_checkpoint, resumable_checkpoints
    from zimage.training.distributed import is_main_rank

    folder = RunFolder(run_dir)
    if not folder.config_path.exists():
        raise UserError(f"--resume {run_dir}: not a run folder (no config.json there)")
    status = folder.read_status()
    state = status.get("state")
    if state == "completed":
        raise UserError(f"--resume {run_dir}: the run already completed; start a new run to train further")
    if is_main_rank() and state in ACTIVE_STATES and status.get("pid") and folder.worker_alive():
        raise UserError(f"--resume {run_dir}: the run is {state} in process {status.get('pid')}; stop it first")
    if checkpoint_name:  # refused before anything changes in the run folder
        ckpt = find_checkpoint(folder.checkpoints_dir, checkpoint_name)
        skipped = []
    else:
        good, skipped = resumable_checkpoints(folder.checkpoints_dir)
        ckpt = good[0] if good else None
    config = build_config(read_config_file(folder.config_path))
    # The LoRA this run saved when it stopped may be replaced by the resumed run; any other file may not.
    earlier = status.get("output_path")
    ours = bool(earlier) and Path(earlier).exists()
    try:
        resolved = validate_config(config.replace(overwrite=True) if ours else config, settings)
        if ours and resolved.output_path != Path(earlier) and not config.overwrite:
            resolved = validate_config(config, settings)
    except ConfigError as exc:
        if is_main_rank():
            folder.update_status(state="failed", error=str(exc), ended=time.time())
        raise
    from zimage.training.memory_fit import with_memory_warning

    resolved = with_memory_warning(resolved)
    if is_main_rank():
        folder.retire_control()  # the stop that ended the earlier process is not a request to this one
        for bad, why in skipped:
            if ckpt is None or bad.step > ckpt.step:
                print(f"skipped damaged checkpoint {bad.path}: {why}", file=sys.stderr, flush=True)
        where = f"step {ckpt.step} ({ckpt.path.name})" if ckpt else "step 0 (no checkpoint yet)"
        print(f"run folder: {run_dir}\nresuming from {where}", flush=True)
    return _train_with_progress(resolved, settings, run_dir, resume=True, checkpoint=ckpt, chosen=checkpoint_name)


def _train_with_progress(resolved, settings, run_dir: Path, resume: bool = False, checkpoint=None, chosen=None) -> int:
    """Train with a progress bar; `checkpoint` is where a resume starts, `chosen` the --checkpoint name."""
    from tqdm import tqdm

    from zimage.training.distributed import is_main_rank
    from zimage.training.runner import run_training

    quiet = None if is_main_rank() else True  # one progress bar, not one per process
    bar = tqdm(total=resolved.config.num_steps, unit="step", dynamic_ncols=True, disable=quiet, file=sys.stderr)
    if resume:
        bar.update(checkpoint.step if checkpoint else 0)

    def on_step(record: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)

    def echo(message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    try:
        code = run_training(resolved, settings, run_dir, echo=echo, on_step=on_step, resume=resume,
                            checkpoint_name=chosen)  # fmt: skip
    finally:
        bar.close()
    from zimage.runfolder import RunFolder

    if not is_main_rank():
        return code
    status = RunFolder(run_dir).read_status()
    if code == 0:
        print(f"{status.get('state')}: {status.get('output_path')}")
    else:
        print(f"error: {status.get('error')}", file=sys.stderr)
    return code
