"""`zimage registry rebuild`: recreate registry.duckdb from the folders (safe while the app runs: the
app does it and answers); `zimage registry status`: who owns the registry, and its size."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("registry", help="the run index: `registry rebuild`, `registry status`")
    rsub = p.add_subparsers(dest="registry_command", metavar="ACTION")
    r = rsub.add_parser("rebuild", help="recreate the database from the run and dataset folders")
    r.add_argument("--timeout", type=float, default=600, help="seconds to wait for the app to do it")
    r.set_defaults(handler=run_rebuild)
    s = rsub.add_parser("status", help="who owns the registry and how big it is")
    s.set_defaults(handler=run_status)
    p.set_defaults(handler=run_status)


def run_rebuild(args) -> int:
    from zimage.jobs import rebuild
    from zimage.settings import get_settings

    counts = rebuild(get_settings().ensure(), timeout=args.timeout)
    print(
        f"rebuilt by {counts['by']} in {counts['seconds']:.1f} s: {counts['runs']} runs, "
        f"{counts['metrics']} metric rows, {counts['samples']} samples, {counts['datasets']} datasets"
    )
    return 0


def run_status(args) -> int:
    from zimage.jobs.owner import OwnerLock, describe_owner
    from zimage.jobs.queue import run_dirs
    from zimage.settings import get_settings

    settings = get_settings()
    db = settings.db_path
    size = f"{db.stat().st_size / 1e6:.1f} MB" if db.exists() else "not created yet"
    print(f"database  {db} ({size})")
    print(f"owner     {describe_owner(OwnerLock(settings).owner())}")
    print(f"runs      {len(run_dirs(settings))} folders in {settings.runs_dir}")
    return 0
