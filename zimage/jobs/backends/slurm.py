"""The `slurm` launcher: sbatch through submitit (the `[slurm]` extra), one node per job.

The job is the worker's command line wrapped in `submitit.helpers.CommandFunction`, so only a command is
pickled into the run folder (`RUN/slurm/`, on the shared home, where submitit also keeps its logs). The
command appends the worker's output to the run's log.txt, as the local launcher does. A train job over N
GPUs asks for one task with N GPUs on one node and runs torchrun inside the allocation (the GPU path of
zimage.jobs.ranks). Partition, account, QoS, time limit, CPUs and memory come from `[slurm]` in
settings.toml; `max_jobs` is how many of the studio's jobs may be in Slurm (pending or running) at once.

`executor = "local"` runs the same code through submitit's local executor on this host (no sbatch): for
trying the backend, and for the tests.
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from zimage.jobs import backends, launcher
from zimage.jobs.backends import Backend, BackendError, Call, Capacity, Handle, Health, JobSpec, Poll, bounded
from zimage.settings import Settings, SlurmSettings

log = logging.getLogger("zimage.jobs")

# sacct's job states (and the local executor's) -> the interface's; anything else is "unknown"
RUNNING = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "COMPLETING",
           "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "STOPPED")  # fmt: skip
FINISHED = ("COMPLETED", "FINISHED")
FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
          "REVOKED", "SPECIAL_EXIT", "INTERRUPTED")  # fmt: skip


def slurm_state(state: str) -> Poll:
    """A Slurm job state as sacct prints it ("CANCELLED by 1234", "RUNNING", "OUT_OF_MEMORY"...) as a poll
    answer; the detail keeps Slurm's words."""
    text = " ".join(str(state or "").split())
    word = text.split(" ")[0].upper().rstrip("+") if text else ""
    detail = f"Slurm: {text or 'no state'}"
    if word in RUNNING:
        return Poll("running", detail)
    if word in FINISHED:
        return Poll("finished", detail)
    if word in FAILED:
        return Poll("failed", detail)
    return Poll("unknown", detail)


def sbatch_parameters(section: SlurmSettings, spec: JobSpec) -> dict:
    """The parameters of submitit's SlurmExecutor (sbatch's own names) for `spec`: one node, one task, the
    job's GPUs on that node (torchrun starts one rank per GPU inside the allocation)."""
    params: dict = {
        "job_name": f"zimage-{spec.kind}-{spec.run_id}"[:120],
        "time": section.time_limit_min,
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": section.cpus_per_task,
        "signal_delay_s": 120,  # SIGUSR2 that long before the time limit (submitit's requeue signal)
    }
    if spec.gpus and section.gpus_per_node:
        params["gpus_per_node"] = spec.gpus
    for key in ("partition", "account", "qos"):
        if getattr(section, key):
            params[key] = getattr(section, key)
    if section.mem_gb:
        params["mem"] = f"{section.mem_gb}GB"
    if section.setup:
        params["setup"] = list(section.setup)
    if section.sbatch:
        params["additional_parameters"] = {k: v for k, v in section.sbatch.items()}
    return params


def sbatch_script(section: SlurmSettings, spec: JobSpec, folder: Path, python: str | None = None) -> str:
    """The sbatch file submitit writes for `spec` (what a submission would send; for checking by eye or test)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(python or launcher.sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])  # fmt: skip
    return _make_sbatch_string(command=command, folder=folder, **sbatch_parameters(section, spec))


def job_command(settings: Settings, spec: JobSpec, python: str | None) -> list[str]:
    """The command the allocation runs: the worker's, with ZIMAGE_HOME set and its output appended to log.txt."""
    worker = launcher.remote_command(spec.kind, spec.run_dir, spec.gpus, python)
    log = spec.run_dir / "log.txt"
    env = [f"ZIMAGE_HOME={settings.home}", "PYTHONUNBUFFERED=1", "CUDA_DEVICE_ORDER=PCI_BUS_ID",
           "ZIMAGE_BACKEND=slurm", f"ZIMAGE_BACKEND_LOG={spec.run_dir / 'slurm' / '%j_0_log.out'}"]  # fmt: skip
    return ["sh", "-c", 'log=$1; shift; exec "$@" >>"$log" 2>&1', "zimage-worker", str(log), "env", *env, *worker]


_JOBS: dict[str, object] = {}
SBATCH_TIMEOUT_S = 60.0  # the most sbatch or sacct may take before the scheduler moves on


@atexit.register
def _forget_jobs() -> None:
    """Drop the job objects before the interpreter tears down (their __del__ then meets a half-gone module)."""
    _JOBS.clear()
    backends._LATE.clear()


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(self, settings: Settings, section: SlurmSettings):
        self.settings, self.section = settings, section
        self._jobs = _JOBS  # job id -> submitit Job (the local executor's process lives there)

    def _executor(self, folder: Path):
        import submitit

        if self.section.executor == "local":
            executor = submitit.LocalExecutor(folder=folder, python=self.section.python)
            return executor
        try:
            return submitit.SlurmExecutor(folder=folder, python=self.section.python)
        except RuntimeError as exc:  # no srun on this host
            raise BackendError(f"slurm: {exc}") from None

    def submit(self, spec: JobSpec) -> Handle:
        from submitit.helpers import CommandFunction

        job = self._earlier_sbatch(spec.run_id)
        if job is None:
            folder = spec.run_dir / "slurm"
            executor = self._executor(folder)
            if self.section.executor == "local":
                executor.update_parameters(timeout_min=self.section.time_limit_min, tasks_per_node=1,
                                           gpus_per_node=spec.gpus if self.section.gpus_per_node else 0)  # fmt: skip
            else:
                executor.update_parameters(**sbatch_parameters(self.section, spec))
            command = CommandFunction(job_command(self.settings, spec, self.section.python), verbose=False)
            call = Call("slurm: sbatch", executor.submit, command)
            try:
                job = call.wait(SBATCH_TIMEOUT_S)
            except BackendError as exc:  # sbatch may still submit it: kept, and asked again before any resend
                backends.keep_late(spec.run_id, call, self._cancel_late)
                raise BackendError(f"{exc}; the job may still be submitted, so it is not sent again before "
                                   "sbatch answers") from None  # fmt: skip
            except Exception as exc:  # sbatch refused it (partition, account, limits), or could not run
                raise BackendError(f"slurm: the job was not submitted: {_short(exc)}") from None
        self._jobs[str(job.job_id)] = job
        where = "submitit local executor" if self.section.executor == "local" else "slurm"
        return Handle("slurm", str(job.job_id), log=str(job.paths.stdout), address=where)

    def _earlier_sbatch(self, run_id: str):
        """The job an earlier sbatch of this run submitted after the scheduler stopped waiting for it; None
        when there was none or it failed (submit anew); BackendError while it still has not answered."""
        earlier = backends.late(run_id)
        if earlier is None:
            return None
        if not earlier.done():
            raise BackendError(f"slurm: the sbatch sent {time.time() - earlier.started:.0f} s ago has not "
                               "answered yet; the job is not sent again before it does")  # fmt: skip
        try:
            job = earlier.wait(0)
        except Exception as exc:
            log.warning("run %s: the late sbatch failed (%s); submitting again", run_id, _short(exc))
            return None
        log.info("run %s: the late sbatch answered: job %s", run_id, job.job_id)
        return job

    def _cancel_late(self, job) -> None:
        log.warning("slurm job %s: a late sbatch answer for a run that no longer waits for it; cancelling",
                    job.job_id)  # fmt: skip
        self.cancel(Handle("slurm", str(job.job_id), log=str(job.paths.stdout)))

    def _job(self, handle: Handle):
        job = self._jobs.get(handle.job_id)
        if job is None and self.section.executor == "slurm":
            import submitit

            job = self._jobs[handle.job_id] = submitit.SlurmJob(handle_folder(handle), handle.job_id)
        return job

    def poll(self, handle: Handle) -> Poll:
        job = self._job(handle)
        if job is None:  # the local executor's job of an earlier scheduler: its controller's PID is the id
            alive = launcher.process_alive(int(handle.job_id), None) if handle.job_id.isdigit() else False
            return slurm_state("RUNNING" if alive else "INTERRUPTED")
        try:
            poll = slurm_state(bounded("slurm: sacct", SBATCH_TIMEOUT_S, getattr, job, "state"))
        except Exception as exc:  # sacct could not be asked
            return Poll("unknown", f"Slurm: {_short(exc, 300)}")
        if poll.state in ("finished", "failed"):
            self._jobs.pop(handle.job_id, None)  # ended: nothing more to ask it
        return poll

    def cancel(self, handle: Handle) -> None:
        job = self._job(handle)
        try:
            if self.section.executor == "local":  # its controller's whole tree: the worker is a grandchild
                launcher.kill_job(int(handle.job_id), None, grace=5.0)
            elif job is not None:
                job.cancel(check=False)
        except Exception as exc:
            raise BackendError(f"slurm: could not cancel job {handle.job_id}: {exc}") from None

    def capacity(self) -> Capacity:
        return Capacity(self.section.max_jobs, "job", self.section.gpus_per_node or None, "in Slurm")

    def preview(self, spec: JobSpec) -> str:
        folder = spec.run_dir / "slurm"
        command = shlex.join(job_command(self.settings, spec, self.section.python))
        if self.section.executor == "local":
            gpus = spec.gpus if self.section.gpus_per_node else 0
            return "\n".join([
                f"slurm: submitit's local executor on this host (no sbatch), its files in {folder}",
                f"  parameters: timeout_min={self.section.time_limit_min} tasks_per_node=1 gpus_per_node={gpus}",
                f"  the job runs: {command}",
            ])  # fmt: skip
        script = sbatch_script(self.section, spec, folder, self.section.python)
        return "\n".join([
            f"slurm: sbatch, with submitit's files in {folder}; the sbatch file:", "",
            script.rstrip(), "",
            f"the task runs (pickled as submitit's CommandFunction): {command}",
        ])  # fmt: skip

    def health(self) -> Health:
        if self.section.executor == "local":
            return Health(True, f"submitit's local executor on this host (max {self.section.max_jobs} jobs)")
        sinfo = shutil.which("sinfo")
        if not shutil.which("sbatch") or not sinfo:
            return Health(False, "slurm: sbatch and sinfo are not on this host's PATH; is it a Slurm login node?")
        part = self.section.partition
        cmd = [sinfo, "-h", "-o", "%P %a %D %t", *(["-p", part] if part else [])]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=dict(os.environ))
        except (OSError, subprocess.SubprocessError) as exc:
            return Health(False, f"slurm: sinfo failed: {exc}")
        if out.returncode != 0:
            return Health(False, f"slurm: sinfo failed: {' '.join(out.stderr.split())[:300]}")
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        if part and not lines:
            return Health(False, f"slurm: no partition {part!r} (sinfo lists none)")
        return Health(True, f"Slurm: partition {part or '(default)'}, {len(lines)} node group(s); "
                            f"max {self.section.max_jobs} jobs")  # fmt: skip


def handle_folder(handle: Handle) -> Path:
    """submitit's folder of a job from its log path (RUN/slurm/<id>_0_log.out)."""
    return Path(handle.log).parent if handle.log else Path(".")


def _short(exc: BaseException, limit: int = 400) -> str:
    return " ".join(str(exc).split())[:limit]
