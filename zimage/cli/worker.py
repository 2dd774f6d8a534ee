"""`zimage worker`: this host's scheduler without the UI (ingest, reconcile, start queued jobs).

Only one scheduler runs per host. If the app already runs one, this waits and takes over when the app
stops (so the queue keeps going); an app started later asks this worker to hand the registry over.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("worker", help="run the job scheduler in the foreground (no UI)")
    p.add_argument("--gpus", help="GPU ids to use, e.g. 0,1 ('none' for CPU only); default: detect")
    p.add_argument("--jobs-per-gpu", type=int, help="jobs sharing one GPU (default 1)")
    p.add_argument("--no-launch", action="store_true", help="keep the registry up to date but start no jobs")
    p.add_argument("--no-wait", action="store_true", help="exit at once if another scheduler runs")
    p.add_argument("--tick", type=float, default=1.0, help="seconds between passes (default 1)")
    p.set_defaults(handler=run)


def run(args) -> int:
    import logging
    import signal
    import sys

    from zimage.jobs.owner import OwnerLock, describe_owner
    from zimage.jobs.scheduler import Scheduler
    from zimage.jobs.slots import slot_config
    from zimage.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = get_settings().ensure()
    slots = slot_config(args.gpus, args.jobs_per_gpu, home=settings.home_settings().scheduler)
    holder = OwnerLock(settings).owner()
    if holder:
        if args.no_wait:
            print(f"error: the scheduler already runs in {describe_owner(holder)}", file=sys.stderr)
            return 1
        print(f"the scheduler runs in {describe_owner(holder)}; waiting to take over", flush=True)
    sched = Scheduler(settings, slots=slots, role="worker", launch_jobs=not args.no_launch, tick=args.tick)
    signal.signal(signal.SIGTERM, lambda *_: sched.stop(timeout=0))
    print(f"zimage worker: {settings.home}; {slots.describe()}", flush=True)
    try:
        reason = sched.run()
    except KeyboardInterrupt:
        reason = "interrupted"
    print(f"zimage worker: {reason}; running jobs keep running", flush=True)
    return 0
