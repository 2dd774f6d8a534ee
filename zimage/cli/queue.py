"""`zimage queue`: show the job queue; `queue add CONFIG` enqueues a run; `queue up|down|cancel RUN`.

Works while the app runs: the queue lives in the run folders (see zimage/jobs/queue.py), not in the
database, and the host's scheduler (the app or `zimage worker`) starts queued jobs as slots free up.
"""

from __future__ import annotations

import sys
import time


def register(sub) -> None:
    p = sub.add_parser("queue", help="show the job queue; `queue add CONFIG` enqueues a training run")
    qsub = p.add_subparsers(dest="queue_command", metavar="ACTION")
    a = qsub.add_parser("add", help="enqueue a job (default: a training run) from a JSON/YAML config")
    a.add_argument("config", help="config file (.json / .yaml)")
    a.add_argument("--kind", default="train", help="train (default), caption or testgrid")
    a.add_argument("--name", help="a name for the run (default: the config's output_name)")
    a.add_argument("--gpus", type=int, default=1, help="GPUs the job needs (default 1)")
    a.add_argument("--priority", help="high, normal or low (default: the home's [scheduler] default_priority)")
    a.add_argument("--backend", help="local, ray or slurm (default: the home's launcher in settings.toml)")
    a.add_argument("--preset", help="training preset to start from (train only)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one training field (repeatable)")  # fmt: skip
    a.add_argument("--dry-run", action="store_true",
                   help="check the config and print what would be sent to the launcher (the sbatch file, the Ray "
                        "job, the command); queue nothing")  # fmt: skip
    a.set_defaults(handler=run_add)
    for action, text in (("up", "move a queued job one place up"), ("down", "move a queued job one place down"),
                         ("cancel", "take a queued job out of the queue")):  # fmt: skip
        c = qsub.add_parser(action, help=text)
        c.add_argument("run_id")
        c.add_argument("--as-admin", action="store_true", help="act on another user's job (admins only; recorded)")
        c.set_defaults(handler=run_move, action=action)
    p.set_defaults(handler=run_show)


def _load_config(args, settings) -> dict:
    from zimage.config import build_config, parse_override, read_config_file, validate_config
    from zimage.errors import UserError

    raw = read_config_file(args.config)
    if args.kind != "train":
        if args.preset or args.overrides:
            raise UserError("--preset and --set apply to training runs only")
        return raw
    overrides = dict(parse_override(item) for item in args.overrides)
    config = build_config(raw, preset=args.preset, overrides=overrides)
    resolved = validate_config(config, settings)  # refuse now, not when the job's turn comes
    from zimage.training.memory_fit import with_memory_warning

    for warning in with_memory_warning(resolved).warnings:  # e.g. the estimate above the host's memory
        print(f"note: {warning}", file=sys.stderr)
    return config.to_dict()


def run_add(args) -> int:
    from zimage.jobs import enqueue, os_user
    from zimage.jobs.queue import queued_runs
    from zimage.settings import get_settings

    settings = get_settings().ensure()
    config = _load_config(args, settings)
    if args.dry_run:
        return _dry_run(args, settings)
    from zimage.auth import cli_actor

    actor = cli_actor(settings)
    run_id = enqueue(settings, args.kind, config, user=os_user(), name=args.name, gpus=args.gpus, actor=actor,
                     priority=args.priority, backend=args.backend)  # fmt: skip
    line = [rid for rid, _ in queued_runs(settings)]
    where = f"position {line.index(run_id) + 1}" if run_id in line else "already started"
    print(f"queued {run_id} ({where})")
    print(f"run folder: {settings.runs_dir / run_id}")
    return 0


def _dry_run(args, settings) -> int:
    """What `queue add` would hand the launcher for this job, with RUN_ID for the id it gets when queued."""
    from zimage.jobs import os_user
    from zimage.jobs.backends import JobSpec, check_backend, get_backend
    from zimage.jobs.dispatch import refusal
    from zimage.jobs.queue import KINDS, JobError

    if args.kind not in KINDS:
        raise JobError(f"--kind: {args.kind!r} is not a job kind; allowed: {', '.join(KINDS)}")
    if args.gpus < 1:
        raise JobError(f"--gpus: {args.gpus!r} must be a whole number of at least 1")
    name = check_backend(args.backend, "--backend") if args.backend else settings.home_settings().launcher
    spec = JobSpec("RUN_ID", settings.runs_dir / "RUN_ID", args.kind, gpus=args.gpus, user=os_user())
    text = get_backend(settings, name).preview(spec)
    print(f"dry run: the config is valid; nothing was queued (RUN_ID stands for the run's id). Launcher: {name}")
    print(text)
    why = refusal(settings, name, args.gpus)
    if why is not None:
        print(f"error: queued, it would fail at its turn: {why}", file=sys.stderr)
        return 2
    return 0


def run_move(args) -> int:
    from zimage.auth import cli_actor
    from zimage.jobs import cancel, move_down, move_up
    from zimage.settings import get_settings

    settings = get_settings()
    actor = cli_actor(settings, as_admin=args.as_admin)
    if args.action == "cancel":
        cancel(settings, args.run_id, actor=actor)
        print(f"cancelled {args.run_id}")
    else:
        pos = (move_up if args.action == "up" else move_down)(settings, args.run_id, actor=actor)
        print(f"{args.run_id} is now at position {pos + 1}")
    return 0


def _age(t) -> str:
    if not t:
        return "-"
    s = max(0, int(time.time() - float(t)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _waiting(status: dict) -> str:
    """Why a queued job has not started (the scheduler's words) and how long it has been in line."""
    why = status.get("waiting")
    return f"{why} ({_age(status.get('created'))})" if isinstance(why, str) and why else _age(status.get("created"))


def run_show(args) -> int:
    from zimage.jobs.owner import OwnerLock, describe_owner
    from zimage.jobs.runinfo import damaged_runs, queue_view
    from zimage.settings import get_settings

    settings = get_settings()
    queued, active = queue_view(settings)
    damaged = [r for r in damaged_runs(settings) if r["state"] in ("damaged", "queued")]  # what may not start
    owner = OwnerLock(settings).owner()
    hint = "" if owner else " (queued jobs wait: start the app or `zimage worker`)"
    from zimage.jobs.backends import health

    name, state = health(settings)
    print(f"scheduler: {describe_owner(owner)}{hint}; launcher: {name} "
          f"({'ok' if state.ok else 'cannot be used'}: {state.summary})")  # fmt: skip
    print(f"{'POS':<4} {'RUN':<44} {'KIND':<9} {'USER':<12} {'STATE':<10} {'PRIORITY':<8} {'ON':<6} {'GPUS':<6} "
          "WAITING/STEP")  # fmt: skip
    for run in active:
        st = run["status"]
        step = f"{run['step'] or 0}/{run['total_steps'] or '?'}"
        job = f" (job {st['backend_job_id']})" if st.get("backend_job_id") and st.get("backend") != "local" else ""
        gpus = st.get("gpu_ids") or (str(st.get("gpus") or 1) if job else "cpu")
        print(f"{'-':<4} {run['run_id']:<44} {run['kind'] or '?':<9} {run['user'] or '?':<12} {run['state']:<10} "
              f"{st.get('priority') or 'normal':<8} {st.get('backend') or 'local':<6} {gpus:<6} {step}{job}")  # fmt: skip
    for pos, (run_id, st) in enumerate(queued, 1):
        on = st.get("backend") or name
        print(f"{pos:<4} {run_id:<44} {st.get('kind') or '?':<9} {st.get('user') or '?':<12} {'queued':<10} "
              f"{st.get('priority') or 'normal':<8} {on:<6} {st.get('gpus') or 1:<6} {_waiting(st)}")  # fmt: skip
    if not queued and not active:
        print("(the queue is empty and nothing is running)")
    for run in damaged:
        print(f"damaged  {run['run_id']}: {run['problem']}")
    return 0
