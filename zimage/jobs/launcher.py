"""Starting workers detached, and telling whether a worker is still alive.

A worker is `python -m zimage.cli KIND --run-dir DIR` (train, caption, testgrid: the commands of
those names, each a zimage.job.run_job). It runs in its own process session with stdin closed and
stdout/stderr appended to DIR/log.txt, so it survives the browser, the page and the app itself (the
worker sees that its output is log.txt and does not echo its log lines there a second time). Before
the process starts, status.json is set to "starting" with its GPU ids; right after, DIR/launch.json
records the PID and the process start time (a separate file, so it never races the worker's own
status.json writes). The worker then records its PID in status.json itself.

A worker is alive when a process with its PID exists, is not a zombie, and started when the recorded
start time says: a reused PID has a different start time.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from zimage.fsio import write_json
from zimage.records import Damaged
from zimage.run_records import read_launch
from zimage.runfolder import RunFolder, process_start_time
from zimage.settings import Settings


def worker_command(kind: str, run_dir: Path) -> list[str]:
    """The command line that runs one job of `kind` in `run_dir`."""
    return [sys.executable, "-m", "zimage.cli", kind, "--run-dir", str(run_dir)]


def launch(settings: Settings, run_id: str, kind: str, gpu_ids: list[str]) -> subprocess.Popen:
    """Start the worker of a queued run, detached; the caller holds the queue lock."""
    folder = RunFolder(settings.runs_dir / run_id)
    visible = ",".join(gpu_ids)
    folder.update_status(
        state="starting",
        gpu_ids=visible,
        host=socket.gethostname(),
        launched=time.time(),
        pid=None,
        pid_start_time=None,
        error=None,
        ended=None,
    )
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES=visible, ZIMAGE_HOME=str(settings.home), PYTHONUNBUFFERED="1")
    cmd = worker_command(kind, folder.path)
    with open(folder.log_path, "ab") as log:
        log.write(
            f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] launch: {' '.join(cmd)} (GPUs: {visible or 'none'})\n".encode()
        )
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session: no signal of the app's terminal reaches it
                close_fds=True,
                cwd=str(folder.path),
                env=env,
            )
        except OSError as exc:
            folder.update_status(state="failed", error=f"could not start the worker: {exc}", ended=time.time())
            raise
    record = {"pid": proc.pid, "pid_start_time": process_start_time(proc.pid), "cmd": cmd, "gpu_ids": visible}
    record["launched"] = time.time()
    write_json(folder.path / "launch.json", record)
    return proc


def process_alive(pid: int | None, start_time: float | None) -> bool:
    """True if `pid` runs, is not a zombie, and (when known) started at `start_time`."""
    import psutil

    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, OverflowError):
        return False
    return start_time is None or abs(created - float(start_time)) < 1.0


def worker_identity(run_dir: Path, status: dict) -> tuple[int | None, float | None]:
    """(pid, start time) of a run's worker: the worker's own record, else the launcher's.

    `status` is a valid status (RunFolder.read_status); a damaged launch.json counts as none."""
    if status.get("pid"):
        return status["pid"], status.get("pid_start_time")
    rec = read_launch(Path(run_dir) / "launch.json")
    if rec is None or isinstance(rec, Damaged):
        return None, None
    if rec.pid and (rec.launched or 0.0) >= (status.get("launched") or 0.0) - 1:
        return rec.pid, rec.pid_start_time
    return None, None
