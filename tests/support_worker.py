"""A controllable worker for the scheduler tests that need one (fail at step N, write metrics at a set rate).

It is not a product kind: `install(monkeypatch)` lets *this* test process's scheduler launch it for jobs of
kind "support" (it adds the kind to the queue's KINDS and maps it to this file in the
launcher's command), and the scheduler then runs it like any worker, detached, with output in log.txt:

    python tests/support_worker.py --run-dir DIR

It is a zimage.job.run_job kind like the trainer and the captioner, so it speaks the same protocol
(status, heartbeat, control requests, final state). DIR/config.json:

    steps           steps to run (default 10)
    interval        seconds to sleep after each batch of lines (default 0.05)
    lines_per_tick  metric lines written per batch (default 1)
    fail_at         raise RuntimeError at this step (state "failed", with the traceback tail)
    status_every    seconds between status.json updates (default 0.2)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from zimage.job import Job, run_job

KIND = "support"


def install(monkeypatch) -> None:
    """Let this process's scheduler enqueue and launch jobs of kind "support" (for one test)."""
    from zimage.jobs import launcher, queue

    product_command = launcher.worker_command

    def command(kind: str, run_dir: Path, ranks: int = 1) -> list[str]:
        if kind == KIND:
            return [sys.executable, str(Path(__file__).resolve()), "--run-dir", str(run_dir)]
        return product_command(kind, run_dir, ranks)

    monkeypatch.setattr(launcher, "worker_command", command)
    monkeypatch.setattr(queue, "KINDS", (*queue.KINDS, KIND))


def failed_and_lost_runs(settings, dataset: str = "demo-shapes", fail_at: int = 2) -> tuple[Path, Path]:
    """Two run folders for "what does a person see after things go wrong": one whose worker (this file, a real
    process, output in log.txt) raised at step `fail_at`, and one whose worker died without a final state."""
    import os
    import socket
    import subprocess

    from zimage.runfolder import RunFolder

    failed = RunFolder(settings.runs_dir / "20261203-100000-fails")
    failed.path.mkdir(parents=True)
    failed.write_config({"steps": 5, "fail_at": fail_at, "interval": 0.01})
    failed.update_status(state="starting", kind="train", user="ann", name="fails", created=time.time() - 30)
    with open(failed.log_path, "ab") as log:  # as the launcher runs a worker: its output is log.txt
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run-dir", str(failed.path)],
                       env=dict(os.environ, ZIMAGE_HOME=str(settings.home)), stdout=log, stderr=subprocess.STDOUT,
                       timeout=120)  # fmt: skip
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lost = RunFolder(settings.runs_dir / "20261203-100100-dies")
    lost.path.mkdir(parents=True)
    lost.write_config({"model_path": "tiny-zimage", "dataset_path": dataset, "output_name": "dies"})
    lost.update_status(state="running", kind="train", user="bob", name="dies", pid=dead.pid, pid_start_time=1.0,
                       host=socket.gethostname(), heartbeat=time.time() - 60, step=2, total_steps=10)  # fmt: skip
    return failed.path, lost.path


def work(job: Job) -> dict:
    cfg = job.run.read_config()
    steps = int(cfg.get("steps", 10))
    interval = float(cfg.get("interval", 0.05))
    per_tick = max(1, int(cfg.get("lines_per_tick", 1)))
    status_every = float(cfg.get("status_every", 0.2))
    job.status(state="running", step=0, total_steps=steps)
    started, last_status, step = time.time(), 0.0, 0
    while step < steps:
        req = job.poll_control()
        if req.stop:
            return {"state": "stopped", "step": step}
        if req.pause:
            job.status(state="paused", step=step)
            while req.pause and not req.stop:
                time.sleep(0.05)
                req = job.poll_control()
            if not req.stop:
                job.status(state="running")
            continue
        for _ in range(min(per_tick, steps - step)):
            step += 1
            if step == cfg.get("fail_at"):
                raise RuntimeError(f"support worker failure at step {step}")
            elapsed = time.time() - started
            job.add_metrics({"step": step, "loss": 1.0 / math.sqrt(step) + 0.01 * math.sin(step), "lr": 1e-4,
                             "grad_norm": 1.0, "step_time": interval / per_tick, "elapsed": elapsed,
                             "eta": elapsed / step * (steps - step)})  # fmt: skip
        job.progress(step=step)
        if time.time() - last_status >= status_every:
            job.status(step=step)
            last_status = time.time()
        if interval:
            time.sleep(interval)
    return {"state": "completed", "step": step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="support-worker")
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    return run_job(args.run_dir, KIND, work)


if __name__ == "__main__":
    sys.exit(main())
