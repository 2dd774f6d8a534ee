"""The ray launcher against a real local Ray head (`ray start --head` on free ports, stopped after).

A tiny training run goes through Ray Jobs and completes with its metrics in the registry and its LoRA file
in place; `ray job stop` from outside ends a running one as `stopped` or `lost` within 30 s; an address
nobody answers keeps the job queued with the reason, and the Home page's launcher line says so.
Runs only where the `[ray]` extra is installed (`scripts/install.sh --test` installs it).
"""

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest
import support_worker
from streamlit.testing.v1 import AppTest
from test_jobs_scheduler import status, wait_for  # the scheduler tests' helpers
from train_support import fast_config

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.xdist_group("ray-and-browsers")]  # see pyproject

from zimage.jobs import control, enqueue, ensure_scheduler  # noqa: E402
from zimage.jobs.backends import health  # noqa: E402
from zimage.jobs.backends.ray_jobs import ray_state  # noqa: E402
from zimage.jobs.scheduler import Scheduler  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
ROOT = Path(__file__).resolve().parents[1]
FAST = {"tick": 0.2, "rescan": 1.0}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out for port 0 (Ray's "random" ports and free_ports come from it)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_range(size: int = 40) -> tuple[int, int]:
    """A run of `size` ports that are free now, for Ray's worker processes. It lies outside the kernel's
    ephemeral range, so no port Ray or free_ports takes later (port 0) can land in it, and starts at a
    random place, so two test processes starting heads at once do not pick the same run."""
    low, high = ephemeral_ports()
    span = (10000, low) if low - 10000 >= 20 * size else (high + 1, 65536)
    bases = range(span[0], span[1] - size, size)
    if not bases:
        raise RuntimeError(f"no room outside the ephemeral ports {low}-{high} for Ray's workers")
    first = random.randrange(len(bases))
    for base in [*bases[first:], *bases[:first]]:
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base, base + size - 1
        except OSError:
            continue
    raise RuntimeError("no free port range for Ray's workers")


@contextmanager
def local_head(gpus: int = 0):
    """A one-node Ray cluster on free ports with 2 CPUs and `gpus` GPUs (Ray's logical resources: on this
    CPU machine a job given one is told CUDA_VISIBLE_DEVICES, nothing more); yields its dashboard address.
    Only its own processes are stopped after (not `ray stop`, which ends every cluster on the machine)."""
    gcs, dashboard, client, agent = free_ports(4)
    low, high = free_range()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    cmd = [RAY, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--include-dashboard=true",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--min-worker-port={low}", f"--max-worker-port={high}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
           f"--num-gpus={gpus}", "--object-store-memory=100000000", f"--temp-dir={temp}", "--disable-usage-stats"]  # fmt: skip
    try:
        started = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        marks = (temp, f"--port={gcs}", f"--port={dashboard}", f"--port={client}", f":{gcs}")
        roots = [p for p in psutil.process_iter(["cmdline"]) if any(m in " ".join(p.info["cmdline"] or []) for m in marks)]
        procs = set(roots)
        for root in roots:
            with suppress(psutil.Error):
                procs.update(root.children(recursive=True))
        for proc in procs:
            with suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(list(procs), timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    with local_head() as address:
        yield address


@pytest.fixture()
def on_ray(zhome_demo_shared_cache, ray_head):
    home = zhome_demo_shared_cache
    home.settings_path.write_text(f'launcher = "ray"\n[ray]\naddress = "{ray_head}"\n')
    sched = Scheduler(home, **FAST).start()
    assert sched.ready.wait(15) and sched.scanned.wait(15), sched.status()
    yield home, sched
    sched.stop()


def test_a_tiny_training_run_completes_through_ray_jobs(on_ray, ray_head):
    home, sched = on_ray
    name, state = health(home)
    assert name == "ray" and state.ok, state.summary
    assert f"at {ray_head}: 1 node(s), 0 GPU(s), 2 CPU(s)" in state.summary

    run_id = enqueue(home, "train", fast_config(num_steps=4, output_name="via_ray"), user="ann")
    st = wait_for(lambda: (s := status(home, run_id)).get("state") in ("completed", "failed", "lost") and s, 180,
                  "the run to end")  # fmt: skip
    assert st["state"] == "completed", st.get("error")
    assert st["backend"] == "ray" and st["backend_job_id"].startswith(f"zimage-{run_id}-")
    assert st["backend_log"] == f"ray job logs {st['backend_job_id']} --address {ray_head}"
    assert Path(st["output_path"]).is_file() and Path(st["output_path"]).name == "via_ray.safetensors"
    wait_for(lambda: sched.registry.fetch("SELECT count(*) FROM metrics WHERE run_id = ?", [run_id]) == [(4,)], 20,
             "the metrics ingested")  # fmt: skip
    log = (home.runs_dir / run_id / "log.txt").read_text()
    assert f"submitted to ray as job {st['backend_job_id']}" in log and "Run completed at step 4" in log

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    wait_for(lambda: str(client.get_job_status(st["backend_job_id"])) == "SUCCEEDED", 30, "Ray's job to succeed")
    assert client.get_job_info(st["backend_job_id"]).metadata["zimage_run"] == run_id


def test_ray_job_stop_from_outside_ends_the_run_within_30_s(on_ray, ray_head):
    home, _sched = on_ray
    run_id = enqueue(home, "train", fast_config(num_steps=100000, output_name="stopped_by_ray"), user="ann")
    wait_for(lambda: status(home, run_id).get("state") == "running" and (status(home, run_id).get("step") or 0) > 0,
             180, "the run training")  # fmt: skip
    job_id = status(home, run_id)["backend_job_id"]
    stopped = subprocess.run([RAY, "job", "stop", job_id, "--address", ray_head, "--no-wait"], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    t0 = time.monotonic()
    st = wait_for(lambda: (s := status(home, run_id)).get("state") in ("stopped", "lost") and s, 30, "stopped or lost")
    assert time.monotonic() - t0 < 30
    assert st["step"] > 0 and st["backend_job_id"] == job_id
    if st["state"] == "lost":
        assert f"the ray job {job_id} ended (Ray: STOPPED" in st["error"]


def test_an_unreachable_cluster_keeps_the_job_queued_with_the_reason(zhome):
    (port,) = free_ports(1)  # nobody listens there
    zhome.settings_path.write_text(f'launcher = "ray"\n[ray]\naddress = "http://127.0.0.1:{port}"\n')
    sched = ensure_scheduler(zhome, **FAST)  # the one the Home page below uses too
    try:
        assert sched.ready.wait(15)
        run_id = enqueue(zhome, "train", {"output_name": "x"}, user="ann")
        why = wait_for(lambda: status(zhome, run_id).get("waiting"), 30, "the reason")
        assert why.startswith(f"cannot start: ray: cannot reach the cluster at http://127.0.0.1:{port}")
        assert status(zhome, run_id)["state"] == "queued"
        name, state = health(zhome)
        assert name == "ray" and not state.ok and f"http://127.0.0.1:{port}" in state.summary

        at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()  # the app's own view of it
        assert not at.exception
        assert any(w.value.startswith(f"Launcher **ray** cannot be used now: ray: cannot reach the cluster at "
                                      f"http://127.0.0.1:{port}") for w in at.warning), [w.value for w in at.warning]  # fmt: skip
        queue = next(df.value for df in at.dataframe if "waiting" in df.value.columns)
        row = queue[queue["run"] == run_id].iloc[0]
        assert row["on"] == "ray" and row["waiting"].startswith("cannot start: ray: cannot reach the cluster")
    finally:
        sched.stop()


def test_a_cluster_that_never_answers_costs_a_bounded_wait_not_the_scheduler(zhome, monkeypatch):
    from zimage.jobs.backends import ray_jobs

    support_worker.install(monkeypatch)
    monkeypatch.setattr(ray_jobs, "TIMEOUT_S", 1.0)
    silent = socket.socket()  # accepts connections (the backlog) and never answers a request
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    zhome.settings_path.write_text(f'launcher = "ray"\n[ray]\naddress = "http://127.0.0.1:{port}"\n')
    sched = Scheduler(zhome, **FAST).start()
    try:
        assert sched.ready.wait(15)
        run_id = enqueue(zhome, "train", {"output_name": "x"}, user="ann")
        why = wait_for(lambda: status(zhome, run_id).get("waiting"), 30, "the reason")
        assert why == f"cannot start: ray: cannot reach the cluster at http://127.0.0.1:{port}: ray: " \
                      f"http://127.0.0.1:{port}: no answer within 1 s"
        # Meanwhile the local line goes on: the scheduler's tick is not stuck on the silent cluster.
        here = enqueue(zhome, support_worker.KIND, {"steps": 3, "interval": 0.05}, user="bob", backend="local")
        wait_for(lambda: status(zhome, here).get("state") == "completed", 30, "the local job done")
        assert status(zhome, run_id)["state"] == "queued"
    finally:
        sched.stop()
        silent.close()


@pytest.mark.parametrize(
    ("ray", "state"),
    [("PENDING", "running"), ("RUNNING", "running"), ("SUCCEEDED", "finished"), ("FAILED", "failed"),
     ("STOPPED", "failed"), ("SOMETHING_NEW", "unknown")],
)  # fmt: skip
def test_ray_job_statuses_map_to_run_states(ray, state):
    assert ray_state(ray, "a message").state == state
    assert ray_state(ray, "a message").detail == f"Ray: {ray} (a message)"


def test_on_a_cluster_with_gpus_a_job_asks_ray_for_its_gpus_and_waits_for_one(zhome, monkeypatch):
    support_worker.install(monkeypatch)
    long = {"steps": 100000, "interval": 0.05}
    with local_head(gpus=2) as address:
        zhome.settings_path.write_text(f'launcher = "ray"\n[ray]\naddress = "{address}"\n')
        sched, ids = Scheduler(zhome, **FAST).start(), []
        try:
            assert sched.ready.wait(15)
            assert "1 node(s), 2 GPU(s), 2 CPU(s)" in health(zhome)[1].summary
            big = enqueue(zhome, support_worker.KIND, long, user="ann", gpus=3)
            st = wait_for(lambda: (s := status(zhome, big)).get("state") == "failed" and s, 30, "the big job refused")
            assert st["error"] == "needs 3 GPUs on one node; the largest node on Ray has 2"
            ids += [enqueue(zhome, support_worker.KIND, long, user=u) for u in ("ann", "bob", "cy")]
            wait_for(lambda: [status(zhome, r).get("state") for r in ids[:2]] == ["running", "running"], 60, "two run")
            # Ray gave each its own GPU: the worker records the CUDA_VISIBLE_DEVICES it was started with.
            assert sorted(status(zhome, r)["cuda_visible_devices"] for r in ids[:2]) == ["0", "1"]
            wait_for(lambda: status(zhome, ids[2]).get("waiting") == "waiting for a GPU on Ray (2 of 2 in use by the "
                     "studio)", 10, "the third's reason")  # fmt: skip
            control(zhome, ids[0], "stop")
            wait_for(lambda: status(zhome, ids[2]).get("state") == "running", 60, "the third running")
        finally:
            for run_id in ids:
                if status(zhome, run_id).get("state") in ("starting", "running"):
                    control(zhome, run_id, "stop")
            wait_for(lambda: all(status(zhome, r).get("state") not in ("starting", "running", "stopping") for r in ids),
                     30, "every job stopped")  # fmt: skip
            sched.stop()


def test_a_job_ray_never_knew_and_no_worker_started_is_lost(zhome):
    """Submitted (the scheduler hoped) long ago, no worker ever wrote a heartbeat, and the cluster cannot tell:
    lost after heartbeat_timeout_s, with the job id kept (never submitted a second time)."""
    from zimage.fsio import write_json
    from zimage.runfolder import RunFolder

    (port,) = free_ports(1)
    address = f"http://127.0.0.1:{port}"
    zhome.settings_path.write_text(f'launcher = "ray"\n[scheduler]\nheartbeat_timeout_s = 2\n[ray]\naddress = "{address}"\n')
    folder = RunFolder(zhome.runs_dir / "20261203-140000-limbo-0001")
    folder.path.mkdir(parents=True)
    folder.write_config({"output_name": "limbo"})
    job = "zimage-20261203-140000-limbo-0001-1"
    launched = time.time() - 60
    folder.update_status(state="starting", kind="train", user="ann", backend="ray", launched=launched,
                         backend_job_id=job, backend_log=f"ray job logs {job} --address {address}")  # fmt: skip
    write_json(folder.path / "launch.json", {"backend": "ray", "backend_job_id": job, "launched": launched})
    sched = Scheduler(zhome, **FAST).start()
    try:
        st = wait_for(lambda: (s := folder.read_status()).get("state") == "lost" and s, 30, "the run lost")
        assert st["error"].startswith(f"the ray job {job} never started and ray cannot tell about it (ray: cannot reach")
        assert st["backend_job_id"] == job
    finally:
        sched.stop()
