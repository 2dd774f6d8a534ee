"""Starting workers detached, and telling whether a worker is still alive.

A worker is `python -m zimage.cli KIND --run-dir DIR` (train, caption, testgrid: the commands of
those names, each a zimage.job.run_job). It runs in its own process session with stdin closed and
stdout/stderr appended to DIR/log.txt, so it survives the browser, the page and the app itself (the
worker sees that its output is log.txt and does not echo its log lines there a second time). Before
the process starts, status.json is set to "starting" with its GPU ids; right after, DIR/launch.json
records the PID and the process start time (a separate file, so it never races the worker's own
status.json writes). The worker then records its PID in status.json itself.

A `train` job given N > 1 GPUs runs as N ranks under torch's elastic agent (torchrun):
`python -m zimage.jobs.ranks --nproc-per-node N --run-dir DIR` (see ranks.py). That agent process is the
job's process: launch.json records it with `ranks: N`, and the job is alive while it is (rank 0 records its
own PID in status.json, but the agent outlives every rank and writes the final state when a rank dies).
`CUDA_DEVICE_ORDER=PCI_BUS_ID` makes GPU index i the same GPU for the worker's CUDA as for NVML (Home, slots).

A worker is alive when a process with its PID exists, is not a zombie, and started when the recorded
start time says: a reused PID has a different start time. `kill_job` ends a job's whole process tree
(the agent and every rank: each rank runs in its own session, so a process-group signal would miss them).
"""

from __future__ import annotations

import os
import shlex
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


def worker_command(kind: str, run_dir: Path, ranks: int = 1) -> list[str]:
    """The command line that runs one job of `kind` in `run_dir`; a train job over `ranks` > 1 GPUs runs
    under torch's elastic agent (ranks.py)."""
    if kind == "train" and ranks > 1:
        return [sys.executable, "-m", "zimage.jobs.ranks", "--nproc-per-node", str(ranks), "--run-dir", str(run_dir)]
    return [sys.executable, "-m", "zimage.cli", kind, "--run-dir", str(run_dir)]


def remote_command(kind: str, run_dir: Path, gpus: int, python: str | None = None) -> list[str]:
    """The worker command of a job that a cluster backend runs on `gpus` GPUs of one node (torchrun inside the
    allocation for a train job over several); `python` (settings: the nodes' interpreter) replaces this one."""
    ranks = gpus if kind == "train" and gpus > 1 else 1
    cmd = worker_command(kind, run_dir, ranks) if ranks > 1 else worker_command(kind, run_dir)
    if python and cmd and cmd[0] == sys.executable:
        cmd = [*shlex.split(python), *cmd[1:]]
    return cmd


def ranks_for(kind: str, gpu_ids: list[str]) -> int:
    """Processes a job runs as: one per assigned GPU for training (data parallel), else one."""
    return len(gpu_ids) if kind == "train" and len(gpu_ids) > 1 else 1


def launch(settings: Settings, run_id: str, kind: str, gpu_ids: list[str]) -> subprocess.Popen:
    """Start the worker of a queued run, detached; the caller holds the queue lock."""
    folder = RunFolder(settings.runs_dir / run_id)
    visible = ",".join(gpu_ids)
    folder.update_status(
        state="starting",
        backend="local",
        gpu_ids=visible,
        host=socket.gethostname(),
        launched=time.time(),
        pid=None,
        pid_start_time=None,
        error=None,
        ended=None,
    )
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES=visible, CUDA_DEVICE_ORDER="PCI_BUS_ID", ZIMAGE_HOME=str(settings.home),
               PYTHONUNBUFFERED="1")  # fmt: skip
    ranks = ranks_for(kind, gpu_ids)
    cmd = worker_command(kind, folder.path, ranks) if ranks > 1 else worker_command(kind, folder.path)
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
    record = {"pid": proc.pid, "pid_start_time": process_start_time(proc.pid), "cmd": cmd, "gpu_ids": visible,
              "ranks": ranks}  # fmt: skip
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

    `status` is a valid status (RunFolder.read_status); a damaged launch.json counts as none. A job of several
    ranks is its agent process (launch.json), which outlives the ranks and writes the final state."""
    rec = read_launch(Path(run_dir) / "launch.json")
    current = (
        rec is not None
        and not isinstance(rec, Damaged)
        and bool(rec.pid)
        and (rec.launched or 0.0) >= (status.get("launched") or 0.0) - 1
    )
    if current and _ranks(rec) > 1:
        return rec.pid, rec.pid_start_time
    if status.get("pid"):
        return status["pid"], status.get("pid_start_time")
    if current:
        return rec.pid, rec.pid_start_time
    return None, None


def _ranks(rec) -> int:
    value = (rec.model_extra or {}).get("ranks")
    return value if isinstance(value, int) and not isinstance(value, bool) else 1


def job_processes(pid: int | None, start_time: float | None = None) -> list:
    """The job's process (`pid`, if it is still the one that started at `start_time`) and all its descendants
    (psutil.Process objects); empty when it is gone."""
    import psutil

    if not process_alive(pid, start_time):
        return []
    try:
        root = psutil.Process(int(pid))
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_job(pid: int | None, start_time: float | None = None, grace: float = 10.0) -> list[int]:
    """End a job's whole process tree: SIGTERM to its process (a worker saves and stops; the agent of a
    multi-rank job passes it to every rank), then after `grace` seconds SIGKILL to whatever of the tree is
    left, ranks included. Returns the PIDs that had to be killed."""
    import psutil

    procs = job_processes(pid, start_time)
    if not procs:
        return []
    try:
        procs[0].terminate()
    except psutil.Error:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        procs += [c for c in job_processes(pid, start_time)[1:] if c not in procs]  # ranks started meanwhile
        if not [p for p in procs if _running(p)]:
            return []
        time.sleep(0.2)
    killed = []
    for proc in procs:
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.Error:
            continue
    psutil.wait_procs(procs, timeout=5)
    return killed
