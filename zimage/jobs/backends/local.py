"""The `local` launcher: a detached worker process on this host (zimage.jobs.launcher), the default.

Its slots are this host's GPU ids (zimage.jobs.slots); its jobs are watched by PID and process start time
(zimage.jobs.dispatch.mark_lost), so `poll` here is only the interface's answer for one handle.
"""

from __future__ import annotations

import shlex
import socket
import subprocess

from zimage.jobs import launcher
from zimage.jobs.backends import Backend, Capacity, Handle, Health, JobSpec, Poll
from zimage.settings import Settings

children: dict[str, subprocess.Popen] = {}  # run id -> this process's workers, polled so none stays a zombie


class LocalBackend(Backend):
    name = "local"

    def __init__(self, settings: Settings, slots=None):
        from zimage.jobs.slots import slot_config

        self.settings = settings
        self.slots = slots if slots is not None else slot_config(home=settings.home_settings().scheduler)

    def submit(self, spec: JobSpec) -> Handle:
        proc = launcher.launch(self.settings, spec.run_id, spec.kind, list(spec.gpu_ids))
        children[spec.run_id] = proc
        return Handle("local", str(proc.pid), log=str(spec.run_dir / "log.txt"), address=socket.gethostname())

    def poll(self, handle: Handle) -> Poll:
        pid = int(handle.job_id)
        return (
            Poll("running", f"process {pid}")
            if launcher.process_alive(pid, None)
            else Poll("finished", f"process {pid} ended")
        )

    def cancel(self, handle: Handle) -> None:
        launcher.kill_job(int(handle.job_id), None)

    def capacity(self) -> Capacity:
        ids = self.slots.gpu_ids
        return Capacity(self.slots.capacity, "slot", len(ids) or None, "on this host")

    def health(self) -> Health:
        return Health(True, f"this host ({socket.gethostname()}): {self.slots.describe()}")

    def preview(self, spec: JobSpec) -> str:
        ranks = spec.gpus if spec.kind == "train" and spec.gpus > 1 else 1
        return "\n".join([
            f"local: a detached process on this host ({socket.gethostname()}), on GPUs the scheduler assigns "
            f"({self.slots.describe()})",
            f"  command: {shlex.join(launcher.worker_command(spec.kind, spec.run_dir, ranks))}",
            f"  output: appended to {spec.run_dir / 'log.txt'}",
        ])  # fmt: skip
