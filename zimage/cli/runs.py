"""`zimage runs list|show|stop|pause|resume|delete|export`: runs of every kind, from their folders.

Reads the run folders directly and sends requests through control.json / status.json, so it works the
same whether or not the app (or `zimage worker`) is running and holding the registry database.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("runs", help="list, show and control runs (training, captioning, test grids)")
    rsub = p.add_subparsers(dest="runs_command", metavar="ACTION")
    ls = rsub.add_parser("list", help="runs, newest first")
    ls.add_argument("--state", help="queued, running, completed, failed, lost, ...")
    ls.add_argument("--user")
    ls.add_argument("--dataset")
    ls.add_argument("--kind", help="train, caption or testgrid")
    ls.add_argument("--text", help="text in the run id, name, user, dataset or output name")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(handler=run_list)
    show = rsub.add_parser("show", help="status, config and last metrics of one run")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=run_show)
    for action, text in (
        ("stop", "stop a running run (cancels a queued one)"),
        ("pause", "pause a running run"),
        ("resume", "resume a paused run, or requeue a stopped/failed/lost one from its last checkpoint"),
    ):
        c = rsub.add_parser(action, help=text)
        c.add_argument("run_id")
        c.add_argument("--as-admin", action="store_true", help="act on another user's run (admins only; recorded)")
        c.set_defaults(handler=run_control, action=action)
    d = rsub.add_parser("delete", help="delete a run folder (not its exported LoRA)")
    d.add_argument("run_id")
    d.add_argument("--yes", action="store_true", help="do not ask")
    d.add_argument("--as-admin", action="store_true", help="delete another user's run (admins only; recorded)")
    d.set_defaults(handler=run_delete)
    e = rsub.add_parser("export", help="copy a checkpoint's LoRA to models/loras/trained (best by val_loss, ...)")
    e.add_argument("run_id")
    e.add_argument("--checkpoint", default="best", help="best (lowest val_loss), newest, or a name (step-000040)")
    e.add_argument("--name", help="output file name without .safetensors (default: <output_name>-step<N>)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(handler=run_export)
    p.set_defaults(handler=run_list, state=None, user=None, dataset=None, kind=None, text=None, json=False)


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def run_list(args) -> int:
    from zimage.jobs.runinfo import scan_runs
    from zimage.settings import get_settings

    runs = scan_runs(
        get_settings(), state=args.state, user=args.user, dataset=args.dataset, kind=args.kind, text=args.text
    )
    if args.json:
        for r in runs:
            print(json.dumps({k: v for k, v in r.items() if k not in ("status", "config")}, default=str))
        return 0
    print(f"{'RUN':<44} {'KIND':<9} {'STATE':<10} {'USER':<12} {'DATASET':<16} {'STEP':<12} LOSS")
    for r in runs:
        step = f"{r['step'] or 0}/{r['total_steps'] or '?'}"
        print(f"{r['run_id']:<44} {r['kind'] or '?':<9} {r['state'] or '?':<10} {r['user'] or '?':<12} "
              f"{r['dataset'] or '-':<16} {step:<12} {_fmt(r['last_loss'], '.4f')}")  # fmt: skip
    for r in runs:  # after the table, so its columns stay aligned
        if r["problem"]:
            print(f"damaged  {r['run_id']}: {r['problem']}")
    if not runs:
        print("(no runs)")
    return 0


def run_show(args) -> int:
    from zimage.jobs.runinfo import show_run
    from zimage.runfolder import RunFolder, silence
    from zimage.settings import get_settings

    info = show_run(get_settings(), args.run_id)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    st = info["status"]
    print(f"run      {info['run_id']}  ({info['kind']}, by {info['user'] or '?'})")
    print(f"folder   {info['run_dir']}")
    print(f"state    {info['state']}  step {info['step'] or 0}/{info['total_steps'] or '?'}")
    if info["problem"]:
        print(f"damaged  {info['problem']}")
    if st.get("gpu_ids") is not None:
        print(f"gpus     {st.get('gpu_ids') or 'cpu'}  pid {st.get('pid') or '-'}  host {st.get('host') or '-'}")
    from zimage.jobs.backends import is_remote
    from zimage.jobs.remote import handle_of

    remote = is_remote(st)
    if remote:
        handle = handle_of(RunFolder(info["run_dir"]), st)
        job = handle.job_id if handle else "(not submitted)"
        print(f"backend  {st['backend']}  job {job}  host {st.get('host') or '-'}  pid {st.get('pid') or '-'}")
        print(f"job log  {(handle.log if handle else None) or '-'}")
    quiet = silence(info["state"], st.get("heartbeat"))
    if quiet is not None:
        alive = False if remote else RunFolder(info["run_dir"]).worker_alive()
        why = "its process is alive, so it may be stuck" if alive else "its process is gone"
        if remote:
            why = f"ask {st['backend']} about its job (above)"
        print(f"warning  no heartbeat for {quiet / 60:.0f} min: {why}")
    if st.get("error"):
        print(f"error    {st['error']}")
    if st.get("output_path"):
        print(f"output   {st['output_path']}")
    if info["last_metrics"]:
        print("metrics  " + "  ".join(f"{k}={_fmt(v, '.4g')}" for k, v in info["last_metrics"].items()))
    print(f"samples  {info['samples']}   checkpoints  {len(info['checkpoints']) or '-'}")
    from zimage.training.checkpoints import checkpoint_report  # reads manifests: only when asked

    for name, _step, ok, problem in checkpoint_report(Path(info["run_dir"]) / "checkpoints"):
        print(f"  {name}  {'complete' if ok else 'damaged: ' + problem}")
    print("config   " + json.dumps(info["config"], sort_keys=True))
    return 0


def run_control(args) -> int:
    from zimage.auth import cli_actor
    from zimage.jobs import control, os_user
    from zimage.settings import get_settings

    settings = get_settings()
    actor = cli_actor(settings, as_admin=getattr(args, "as_admin", False))
    done = control(settings, args.run_id, args.action, user=os_user(), actor=actor)
    print(f"{args.run_id}: {done}")
    return 0


def run_delete(args) -> int:
    from zimage.errors import UserError
    from zimage.jobs import delete_run
    from zimage.settings import get_settings

    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError(f"runs delete {args.run_id}: add --yes to delete without asking")
        answer = input(f"delete run folder {args.run_id} (samples, checkpoints, logs)? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    from zimage.auth import cli_actor

    settings = get_settings()
    delete_run(settings, args.run_id, actor=cli_actor(settings, as_admin=getattr(args, "as_admin", False)))
    print(f"deleted {args.run_id}")
    return 0


def run_export(args) -> int:
    from zimage.errors import UserError
    from zimage.run_records import read_config
    from zimage.settings import get_settings
    from zimage.training.export import checkpoint_val_loss, export_lora, pick_checkpoint

    settings = get_settings()
    run_dir = settings.runs_dir / args.run_id
    if not run_dir.is_dir():
        raise UserError(f"runs export {args.run_id}: no such run in {settings.runs_dir}")
    ckpt = pick_checkpoint(run_dir / "checkpoints", args.checkpoint)
    config = read_config(run_dir / "config.json", missing=None)
    data = config.model_dump() if hasattr(config, "model_dump") else {}  # a damaged config: name it by the run
    output_name = data.get("output_name") or args.run_id
    target = settings.loras_dir / f"{args.name or f'{output_name}-step{ckpt.step}'}.safetensors"
    export_lora(ckpt, target, overwrite=args.overwrite)
    val = checkpoint_val_loss(ckpt)
    print(f"exported {ckpt.path.name} (val_loss {_fmt(val, '.5g')}) to {target}")
    return 0
