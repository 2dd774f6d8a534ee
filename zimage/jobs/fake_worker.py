"""A stand-in worker (kind "fake") that speaks the run-folder protocol without training anything.

Tests and benchmarks use it to drive the registry, the queue and the scheduler with real detached
processes. `python -m zimage.jobs.fake_worker --run-dir DIR` reads DIR/config.json:

    steps             steps to run (default 10)
    interval          seconds to sleep after each batch of lines (default 0.05)
    lines_per_tick    metric lines written per batch (default 1)
    fail_at           raise an error at this step (state "failed", with the traceback tail)
    exit_at           leave abruptly at this step without a final state (exit code 3)
    sample_every      append a samples.jsonl line (and a tiny file) every N steps
    checkpoint_every  write checkpoints/step-NNNNNN/ every N steps
    status_every      seconds between status.json updates (default 0.2)

It honours control.json (stop, pause/resume, save_now, sample_now) and, when status.json says
`resume: true`, continues after its last checkpoint, like a real trainer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from zimage.data.folders import atomic_write_text
from zimage.runfolder import RunFolder


def _checkpoint(rf: RunFolder, step: int) -> None:
    final = rf.checkpoints_dir / f"step-{step:06d}"
    tmp = rf.checkpoints_dir / f".tmp-step-{step:06d}"
    tmp.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tmp / "state.json", json.dumps({"step": step}) + "\n")
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.rename(tmp, final)


def _sample(rf: RunFolder, step: int) -> None:
    rf.samples_dir.mkdir(exist_ok=True)
    rel = f"samples/step-{step:06d}-0.txt"
    (rf.path / rel).write_text(f"sample at step {step}\n")
    rf.append_sample({"step": step, "prompt": "a fake prompt", "seed": 42, "path": rel})


def _last_checkpoint(rf: RunFolder) -> int:
    if not rf.checkpoints_dir.is_dir():
        return 0
    steps = [int(p.name.split("-")[-1]) for p in rf.checkpoints_dir.glob("step-*") if p.name.split("-")[-1].isdigit()]
    return max(steps, default=0)


def run(run_dir: Path) -> int:
    rf = RunFolder(run_dir)
    cfg = rf.read_config()
    steps = int(cfg.get("steps", 10))
    interval = float(cfg.get("interval", 0.05))
    per_tick = max(1, int(cfg.get("lines_per_tick", 1)))
    status_every = float(cfg.get("status_every", 0.2))
    resume = bool(rf.read_status().get("resume"))
    start = _last_checkpoint(rf) if resume else 0
    if resume:
        rf.skip_pending_control()
    rf.mark_worker_started("fake", total_steps=steps)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"fake worker pid={os.getpid()} CUDA_VISIBLE_DEVICES={visible!r} start={start}", flush=True)
    rf.update_status(state="running", step=start, cuda_visible_devices=visible)
    t0 = time.time()
    last_status = 0.0
    step = start
    try:
        while step < steps:
            req = rf.poll_control()
            if req.save_now:
                _checkpoint(rf, step)
            if req.sample_now:
                _sample(rf, step)
            if req.stop:
                rf.update_status(state="stopped", step=step, ended=time.time())
                return 0
            if req.pause:
                rf.update_status(state="paused", step=step)
                while req.pause and not req.stop:
                    time.sleep(0.05)
                    req = rf.poll_control()
                    if time.time() - last_status >= 0.5:  # heartbeat while paused
                        rf.update_status(state="paused")
                        last_status = time.time()
                if not req.stop:
                    rf.update_status(state="running")
                continue
            for _ in range(per_tick):
                step += 1
                if step == cfg.get("fail_at"):
                    raise RuntimeError(f"fake failure at step {step}")
                if step == cfg.get("exit_at"):
                    print(f"leaving abruptly at step {step}", flush=True)
                    os._exit(3)
                elapsed = time.time() - t0
                rf.append_metrics(
                    {
                        "step": step,
                        "loss": 1.0 / math.sqrt(step) + 0.01 * math.sin(step),
                        "lr": 1e-4,
                        "grad_norm": 1.0,
                        "step_time": interval / per_tick,
                        "elapsed": elapsed,
                        "eta": elapsed / max(step - start, 1) * (steps - step),
                    }
                )
                if cfg.get("checkpoint_every") and step % int(cfg["checkpoint_every"]) == 0:
                    _checkpoint(rf, step)
                if cfg.get("sample_every") and step % int(cfg["sample_every"]) == 0:
                    _sample(rf, step)
                if step >= steps:
                    break
            if time.time() - last_status >= status_every:
                rf.update_status(step=step)
                last_status = time.time()
            if interval:
                time.sleep(interval)
    except Exception as exc:
        rf.update_status(
            state="failed", step=step, ended=time.time(), error=str(exc), traceback=traceback.format_exc()[-2000:]
        )
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return 1
    rf.update_status(state="completed", step=step, ended=time.time(), output_path=str(rf.path / "output.txt"))
    (rf.path / "output.txt").write_text("done\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zimage-fake-worker")
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    return run(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
