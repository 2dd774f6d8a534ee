"""The `ray` launcher: Ray Jobs on an existing cluster (`JobSubmissionClient`; the `[ray]` extra).

The entrypoint is the worker's own command line (zimage.jobs.launcher.remote_command), its output appended
to the run's log.txt as for a local run (Ray's own log of the job keeps the runtime env's lines); it asks Ray for
its GPUs (`entrypoint_num_gpus`, all on one node; a train job over several runs torchrun there), or, on a
cluster without GPUs, for `[ray] cpus_per_job` CPUs. Its runtime env carries ZIMAGE_HOME, which must be the
same shared folder on every node. The submission id is ours (`zimage-<run id>-<ms>`), so it is written to
status.json before Ray can start the worker. Slots are the cluster's GPUs (alive nodes), or on a CPU-only
cluster its CPUs over cpus_per_job, capped by `[ray] max_jobs`.

The address is `[ray] address` (the dashboard's http://HOST:8265), else RAY_ADDRESS, as Ray's own tools do.
"""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time

from zimage.jobs import launcher
from zimage.jobs.backends import Backend, BackendError, Capacity, Handle, Health, JobSpec, Poll, bounded
from zimage.settings import RaySettings, Settings

log = logging.getLogger("zimage.jobs")

_STATES = {"PENDING": "running", "RUNNING": "running", "SUCCEEDED": "finished", "FAILED": "failed",
           "STOPPED": "failed"}  # fmt: skip
CAPACITY_TTL_S = 5.0
TIMEOUT_S = 10.0  # the most one request to the cluster may take (Ray's client itself has no timeout)


def ray_state(status: str, message: str = "") -> Poll:
    """A Ray job status (JobStatus value) as a poll answer; the detail keeps Ray's words."""
    detail = f"Ray: {status}" + (f" ({_short(message)})" if message else "")
    return Poll(_STATES.get(str(status), "unknown"), detail)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RayBackend(Backend):
    name = "ray"

    def __init__(self, settings: Settings, section: RaySettings):
        self.settings, self.section = settings, section
        self._client = None
        self._lock = threading.Lock()
        self._capacity: tuple[float, Capacity] | None = None
        self._planned: dict[str, Handle] = {}

    # -- the client ---------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        address = self.section.address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise BackendError("ray: no address: set [ray] address in settings.toml (http://HEAD:8265) or RAY_ADDRESS")
        return address

    def client(self):
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                address = self.address
                try:
                    self._client = bounded(f"ray: {address}", TIMEOUT_S, JobSubmissionClient, address)
                except BackendError as exc:
                    raise BackendError(f"ray: cannot reach the cluster at {address}: {exc}") from None
                except Exception as exc:  # ConnectionError, a wrong scheme, a version mismatch
                    raise BackendError(f"ray: cannot reach the cluster at {address}: {_short(exc)}") from None
            return self._client

    def _forget_client(self) -> None:
        with self._lock:
            self._client = None

    # -- the interface ------------------------------------------------------------------------------
    def submit(self, spec: JobSpec) -> Handle:
        handle = self._planned.pop(spec.run_id, None) or self.plan(spec)
        self._planned.pop(spec.run_id, None)
        client = self.client()
        request = self.request(spec, handle, self.capacity().unit == "GPU")
        try:
            bounded(f"ray: submitting to {handle.address}", TIMEOUT_S, client.submit_job, **request)
        except BackendError as exc:  # no answer in time: it may still go through, so never submit it again;
            # the run is watched under this id (remote.py: lost if Ray never knows it and no worker starts)
            log.warning("run %s: %s; watching job %s", spec.run_id, exc, handle.job_id)
        except Exception as exc:
            self._forget_client()
            raise BackendError(
                f"ray: the cluster at {handle.address} refused job {handle.job_id}: {_short(exc)}"
            ) from None
        return handle

    def request(self, spec: JobSpec, handle: Handle, gpus: bool) -> dict:
        """The keyword arguments of `submit_job` for `spec` (`gpus`: the cluster has GPUs to ask for)."""
        cmd = launcher.remote_command(spec.kind, spec.run_dir, spec.gpus, self.section.python)
        resources = {"entrypoint_num_gpus": spec.gpus} if gpus else {"entrypoint_num_cpus": self.section.cpus_per_job}
        env = {"ZIMAGE_HOME": str(self.settings.home), "PYTHONUNBUFFERED": "1",
               "ZIMAGE_BACKEND": "ray", "ZIMAGE_BACKEND_JOB_ID": handle.job_id, "ZIMAGE_BACKEND_LOG": handle.log or ""}  # fmt: skip
        return {
            "entrypoint": f"{shlex.join(cmd)} >>{shlex.quote(str(spec.run_dir / 'log.txt'))} 2>&1",  # as local runs
            "submission_id": handle.job_id,
            "runtime_env": {"env_vars": env},
            "metadata": {"zimage_run": spec.run_id, "user": spec.user or "?"},
            **resources,
        }

    def preview(self, spec: JobSpec) -> str:
        address = self.address
        handle = Handle("ray", f"zimage-{spec.run_id}-MS", log=f"ray job logs zimage-{spec.run_id}-MS --address {address}",
                        address=address)  # fmt: skip
        try:
            gpus, note = self.capacity().unit == "GPU", ""
        except BackendError as exc:  # say what it would be on a GPU cluster, and why it could not be told
            gpus, note = True, f" ({exc}; on a cluster without GPUs: entrypoint_num_cpus={self.section.cpus_per_job:g})"
        request = self.request(spec, handle, gpus)
        resources = ", ".join(f"{k}={v:g}" for k, v in request.items() if k.startswith("entrypoint_num_"))
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in request["runtime_env"]["env_vars"].items())
        return "\n".join([
            f"ray: a Ray Job at {address} (MS: the submission's time in ms)",
            f"  submission id: {request['submission_id']}",
            f"  entrypoint: {request['entrypoint']}",
            f"  resources: {resources}{note}",
            f"  runtime env: {env}",
            f"  metadata: {request['metadata']}",
        ])  # fmt: skip

    def plan(self, spec: JobSpec) -> Handle:
        """The handle a submission of `spec` will have (Ray takes our submission id), before it is made."""
        address = self.address
        job_id = f"zimage-{spec.run_id}-{int(time.time() * 1000)}"
        handle = Handle("ray", job_id, log=f"ray job logs {job_id} --address {address}", address=address)
        self._planned[spec.run_id] = handle  # submit() uses this very id
        return handle

    def poll(self, handle: Handle) -> Poll:
        try:
            info = bounded(f"ray: asking {self.address}", TIMEOUT_S, self.client().get_job_info, handle.job_id)
        except BackendError as exc:
            return Poll("unknown", str(exc))
        except Exception as exc:  # 404: the cluster does not know it (restarted?); or the request failed
            self._forget_client()
            return Poll("unknown", f"Ray: {_short(exc)}")
        return ray_state(str(info.status), info.message or "")

    def cancel(self, handle: Handle) -> None:
        try:
            bounded(f"ray: stopping at {self.address}", TIMEOUT_S, self.client().stop_job, handle.job_id)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"ray: could not stop job {handle.job_id}: {_short(exc)}") from None

    def _nodes(self) -> list:
        from ray.util.state import list_nodes

        client = self.client()
        try:
            nodes = bounded(f"ray: {self.address}", TIMEOUT_S + 1, list_nodes, address=client.get_address(),
                            detail=True, raise_on_missing_output=False, timeout=int(TIMEOUT_S))  # fmt: skip
        except Exception as exc:
            self._forget_client()
            raise BackendError(f"ray: cannot list the nodes of {self.address}: {_short(exc)}") from None
        return [n for n in nodes if str(getattr(n, "state", "")) == "ALIVE"]

    def capacity(self) -> Capacity:
        cached = self._capacity
        if cached is not None and time.monotonic() - cached[0] < CAPACITY_TTL_S:
            return cached[1]
        nodes = self._nodes()
        gpus = [int((n.resources_total or {}).get("GPU", 0)) for n in nodes]
        most = self.section.max_jobs or None
        if sum(gpus):
            cap = Capacity(sum(gpus), "GPU", max(gpus), "on Ray", most)
        else:  # a CPU-only cluster: a job asks for cpus_per_job CPUs, whatever GPUs it names
            cpus = sum(float((n.resources_total or {}).get("CPU", 0)) for n in nodes)
            cap = Capacity(int(cpus // self.section.cpus_per_job), "job", None, "on Ray", most)
        self._capacity = (time.monotonic(), cap)
        return cap

    def health(self) -> Health:
        import ray

        try:
            nodes = self._nodes()
        except BackendError as exc:
            return Health(False, str(exc))
        gpus = sum(int((n.resources_total or {}).get("GPU", 0)) for n in nodes)
        cpus = sum(float((n.resources_total or {}).get("CPU", 0)) for n in nodes)
        return Health(True, f"Ray {ray.__version__} at {self.address}: {len(nodes)} node(s), {gpus} GPU(s), "
                            f"{cpus:g} CPU(s)")  # fmt: skip
