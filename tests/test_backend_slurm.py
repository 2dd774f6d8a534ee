"""The slurm launcher through submitit's local executor (the same code path as sbatch, minus sbatch), and
through submitit's SlurmExecutor against tests/fake_slurm.py (sbatch, srun, sacct, scancel as one-host
stand-ins: the real sbatch file runs, the scheduler watches it by sacct); plus the sbatch parameters it would
send and the mapping from Slurm's job states to run states.

The workers are tests/support_worker.py (through its test-local `install`): real detached processes that
speak the run-folder protocol and run until a stop request reaches them. The scheduler is the real one.
"""

import argparse
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import fake_slurm
import psutil
import pytest
import support_worker
from streamlit.testing.v1 import AppTest
from test_jobs_scheduler import status, wait_for  # the scheduler tests' helpers

pytest.importorskip("submitit")

from zimage.cli.runs import run_show  # noqa: E402
from zimage.fsio import read_json  # noqa: E402
from zimage.jobs import control, enqueue, ensure_scheduler  # noqa: E402
from zimage.jobs.backends import BackendError, JobSpec, check_backend  # noqa: E402
from zimage.jobs.backends.slurm import job_command, sbatch_parameters, sbatch_script, slurm_state  # noqa: E402
from zimage.runfolder import ACTIVE_STATES, RunFolder  # noqa: E402
from zimage.settings import SlurmSettings  # noqa: E402

FAST = {"tick": 0.1, "rescan": 1.0}
ROOT = Path(__file__).resolve().parents[1]
LONG = {"steps": 100000, "interval": 0.05}  # runs until it is stopped


@pytest.fixture()
def cluster(zhome, monkeypatch):
    """A home whose launcher is slurm on submitit's local executor (or `executor="slurm"`: sbatch, which a
    test puts on PATH); returns a function that writes settings.toml (extra lines go under [scheduler] and
    [slurm]) and starts the scheduler."""
    from zimage.jobs import dispatch

    monkeypatch.setenv("ZIMAGE_GPUS", "none")  # the local line: one CPU slot
    monkeypatch.setattr(dispatch, "_backoffs", {})  # a refusal in an earlier test of this process is not ours
    support_worker.install(monkeypatch)
    started = []

    def _start(launcher="slurm", max_jobs=3, user_limit=0, scheduler="", slurm="", executor="local"):
        zhome.settings_path.write_text(
            f'launcher = "{launcher}"\n[scheduler]\nuser_limit = {user_limit}\n{scheduler}\n'
            f'[slurm]\nexecutor = "{executor}"\nmax_jobs = {max_jobs}\ngpus_per_node = 0\n{slurm}\n'
        )
        sched = ensure_scheduler(zhome, **FAST)  # the one a page in the test uses too
        assert sched.ready.wait(15) and sched.scanned.wait(15), sched.status()
        started.append(sched)
        return sched

    yield _start
    live = [RunFolder(p) for p in zhome.runs_dir.iterdir() if RunFolder(p).read_status().get("state") in ACTIVE_STATES]
    for folder in live:
        folder.send_control("stop")  # no worker outlives its test
    wait_for(lambda: not any(f.read_status().get("state") in ACTIVE_STATES for f in live), 30, "the workers to stop")
    for sched in started:
        sched.stop()


def running(settings, ids):
    return [r for r in ids if status(settings, r).get("state") == "running"]


def worker_pid(settings, run_id):
    return wait_for(lambda: status(settings, run_id).get("pid"), 30, f"{run_id}'s worker PID")


@contextmanager
def stopped_while_deaf(settings, run_id):
    """Freeze the run's worker (SIGSTOP: it cannot read control.json any more), ask it to stop, and wait
    until the scheduler has ended the run `stopped` through the backend; the worker is killed after."""
    pid = worker_pid(settings, run_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        control(settings, run_id, "stop")
        st = wait_for(lambda: (s := status(settings, run_id)).get("state") == "stopped" and s, 30, "the run stopped")
        assert "after a stop request" in st["error"]
        yield st
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)


def test_user_limit_over_slurm_slots_two_of_three_start_the_third_says_why(zhome, cluster, capsys):
    cluster(max_jobs=3, user_limit=2)
    ids = [enqueue(zhome, support_worker.KIND, LONG, user="ann", name=f"ann-{i}") for i in range(3)]
    wait_for(lambda: len(running(zhome, ids)) == 2, 60, "two of ann's runs running")
    third = next(r for r in ids if r not in running(zhome, ids))
    wait_for(lambda: status(zhome, third).get("waiting") == "user limit 2 reached", 10, "the third's reason")
    assert status(zhome, third)["state"] == "queued"

    first = running(zhome, ids)[0]
    st = status(zhome, first)
    launch = read_json(zhome.runs_dir / first / "launch.json")
    assert st["backend"] == "slurm" and launch["backend"] == "slurm"
    # The worker recorded the job it runs in (submitit's local job id), the same one the scheduler got back.
    assert st["backend_job_id"] == launch["backend_job_id"] and st["backend_job_id"].isdigit()
    assert (
        st["backend_log"]
        == launch["backend_log"]
        == str(zhome.runs_dir / first / "slurm" / f"{st['backend_job_id']}_0_log.out")
    )
    log = (zhome.runs_dir / first / "log.txt").read_text()
    assert f"submitted to slurm as job {st['backend_job_id']}" in log

    run_show(argparse.Namespace(run_id=first, json=False))
    out = capsys.readouterr().out
    assert f"backend  slurm  job {st['backend_job_id']}" in out and f"job log  {st['backend_log']}" in out

    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    assert not at.exception
    assert "Launcher: **slurm** · submitit's local executor on this host (max 3 jobs)" in [c.value for c in at.caption]
    queue = next(df.value for df in at.dataframe if "waiting" in df.value.columns)
    on = dict(zip(queue["run"], queue["on"], strict=True))
    assert on[first] == f"slurm (job {st['backend_job_id']})" and on[third] == "slurm"

    control(zhome, first, "stop")  # through control.json, as for a local run
    wait_for(lambda: status(zhome, first).get("state") == "stopped", 30, "the first run stopped")
    wait_for(lambda: status(zhome, third).get("state") == "running", 60, "the third run started")


def test_each_backend_has_its_own_line_and_a_full_one_says_why(zhome, cluster):
    cluster(launcher="local", max_jobs=1)
    here = enqueue(zhome, support_worker.KIND, LONG, user="ann", name="here")  # the home's launcher: local
    there = enqueue(zhome, support_worker.KIND, LONG, user="bob", name="there", backend="slurm")
    behind = enqueue(zhome, support_worker.KIND, LONG, user="cy", name="behind", backend="slurm")
    wait_for(lambda: running(zhome, [here, there]) == [here, there], 60, "a local and a slurm run side by side")
    assert status(zhome, here)["backend"] == "local" and status(zhome, there)["backend"] == "slurm"
    wait_for(lambda: status(zhome, behind).get("waiting") == "waiting for a free slot in Slurm (1 of 1 jobs)", 10,
             "the slurm line's reason")  # fmt: skip
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()  # both launchers, each with its health
    captions = [c.value for c in at.caption]
    assert not at.exception and any(c.startswith("Launcher: **local**") for c in captions)
    assert "Also in use: **slurm** · submitit's local executor on this host (max 1 jobs)" in captions


def test_a_job_that_ends_without_a_final_state_is_lost_within_30_s(zhome, cluster):
    cluster()
    run_id = enqueue(zhome, support_worker.KIND, LONG, name="dies")
    wait_for(lambda: (status(zhome, run_id).get("step") or 0) > 0, 60, "the run past its first step")
    job_id = status(zhome, run_id)["backend_job_id"]
    os.kill(worker_pid(zhome, run_id), signal.SIGKILL)
    killed = time.monotonic()
    st = wait_for(lambda: (s := status(zhome, run_id)).get("state") == "lost" and s, 30, "the run lost")
    assert time.monotonic() - killed < 30
    assert f"the slurm job {job_id} ended (Slurm: FINISHED) without the worker writing a final state" in st["error"]
    assert st["step"] > 0 and st["backend_job_id"] == job_id and st["backend_log"].endswith(f"{job_id}_0_log.out")


def test_a_hung_worker_is_lost_by_its_heartbeat_and_its_job_cancelled(zhome, cluster):
    cluster(scheduler="heartbeat_timeout_s = 3")
    run_id = enqueue(zhome, support_worker.KIND, LONG, name="hangs")
    wait_for(lambda: status(zhome, run_id).get("state") == "running", 60, "the run running")
    pid = worker_pid(zhome, run_id)
    os.kill(pid, signal.SIGSTOP)  # a hung node: the process is there, its heartbeat stops
    try:
        st = wait_for(lambda: (s := status(zhome, run_id)).get("state") == "lost" and s, 30, "the run lost")
        assert "heartbeat is" in st["error"] and "while slurm says the job runs" in st["error"]
        wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 20,
                 "the cancelled job's worker gone")  # fmt: skip
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_stop_the_worker_does_not_answer_is_cancelled_through_the_backend(zhome, cluster):
    cluster(scheduler="stop_grace_s = 1\nheartbeat_timeout_s = 600")
    run_id = enqueue(zhome, support_worker.KIND, LONG, name="deaf")
    wait_for(lambda: status(zhome, run_id).get("state") == "running", 60, "the run running")
    with stopped_while_deaf(zhome, run_id):
        assert "did not stop within 1 s; cancelling the slurm job" in (zhome.runs_dir / run_id / "log.txt").read_text()


def test_sbatch_file_for_a_two_gpu_training_job(tmp_path, zhome):
    section = SlurmSettings(partition="gpu", account="vision", qos="normal", time_limit_min=90, cpus_per_task=16,
                            mem_gb=64, gpus_per_node=8, sbatch={"constraint": "h100"}, setup=["module load cuda/12.4"])  # fmt: skip
    spec = JobSpec("20261203-120000-style-1a2b", zhome.runs_dir / "20261203-120000-style-1a2b", "train", gpus=2)
    text = sbatch_script(section, spec, tmp_path / "slurm")
    lines = set(text.splitlines())
    for expected in ("#SBATCH --gpus-per-node=2", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --partition=gpu", "#SBATCH --account=vision", "#SBATCH --qos=normal",
                     "#SBATCH --time=90", "#SBATCH --cpus-per-task=16", "#SBATCH --mem=64GB",
                     "#SBATCH --constraint=h100", "#SBATCH --job-name=zimage-train-20261203-120000-style-1a2b",
                     "module load cuda/12.4"):  # fmt: skip
        assert expected in lines, f"{expected!r} not in:\n{text}"
    assert sbatch_parameters(section, spec)["gpus_per_node"] == 2
    # One task; torchrun inside the allocation starts a rank per GPU, and the output goes to the run's log.txt.
    cmd = job_command(zhome, spec, "/shared/venv/bin/python")
    assert cmd[cmd.index("env") + 1 :][:1] == [f"ZIMAGE_HOME={zhome.home}"]
    tail = cmd[cmd.index("/shared/venv/bin/python") :]
    assert tail == ["/shared/venv/bin/python", "-m", "zimage.jobs.ranks", "--nproc-per-node", "2", "--run-dir",
                    str(spec.run_dir)]  # fmt: skip
    assert str(spec.run_dir / "log.txt") in cmd
    one = job_command(zhome, JobSpec("r", zhome.runs_dir / "r", "caption", gpus=2), None)
    assert one[-4:] == ["zimage.cli", "caption", "--run-dir", str(zhome.runs_dir / "r")]  # captions: one process
    assert "gpus_per_node" not in sbatch_parameters(SlurmSettings(gpus_per_node=0), spec)  # a CPU-only cluster


@pytest.mark.parametrize(
    ("sacct", "state"),
    [("PENDING", "running"), ("RUNNING", "running"), ("REQUEUED", "running"), ("SUSPENDED", "running"),
     ("COMPLETING", "running"), ("CONFIGURING", "running"), ("COMPLETED", "finished"), ("FAILED", "failed"),
     ("CANCELLED by 1234", "failed"), ("CANCELLED+", "failed"), ("TIMEOUT", "failed"), ("OUT_OF_MEMORY", "failed"),
     ("NODE_FAIL", "failed"), ("PREEMPTED", "failed"), ("BOOT_FAIL", "failed"), ("DEADLINE", "failed"),
     ("UNKNOWN", "unknown"), ("", "unknown"), ("FINISHED", "finished"), ("INTERRUPTED", "failed")],
)  # fmt: skip
def test_slurm_job_states_map_to_run_states(sacct, state):
    poll = slurm_state(sacct)
    assert poll.state == state
    assert poll.detail == f"Slurm: {sacct or 'no state'}"


def test_a_bad_backend_name_or_a_missing_extra_is_refused_with_the_field(zhome, monkeypatch):
    with pytest.raises(BackendError, match=r"backend: 'k8s' is not a launcher; allowed: local, ray, slurm"):
        enqueue(zhome, "train", {"output_name": "x"}, backend="k8s")
    assert not any(zhome.runs_dir.iterdir())  # nothing half-queued
    from zimage.jobs import backends

    monkeypatch.setitem(backends._EXTRAS, "slurm", "submitit_not_installed_here")
    with pytest.raises(BackendError, match=r"the slurm launcher needs the \[slurm\] extra: pip install"):
        check_backend("slurm")
    zhome.settings_path.write_text('launcher = "kubernetes"\n')
    from zimage.settings import SettingsFileError

    with pytest.raises(SettingsFileError, match=r"settings.toml: launcher: Input should be 'local', 'ray' or 'slurm'"):
        zhome.home_settings()


def test_queue_add_backend_from_the_command_line(zhome, tmp_path):
    import json
    import subprocess
    import sys

    cfg = tmp_path / "caption.json"
    cfg.write_text(json.dumps({"dataset": "none-yet"}))

    def zimage(*args):
        return subprocess.run([sys.executable, "-m", "zimage.cli", *args], capture_output=True, text=True,
                              env=dict(os.environ, ZIMAGE_HOME=str(zhome.home)), timeout=120)  # fmt: skip

    bad = zimage("queue", "add", str(cfg), "--kind", "caption", "--backend", "k8s")
    assert bad.returncode != 0 and "backend: 'k8s' is not a launcher; allowed: local, ray, slurm" in bad.stderr
    assert "Traceback" not in bad.stderr and not any(zhome.runs_dir.iterdir())
    good = zimage("queue", "add", str(cfg), "--kind", "caption", "--backend", "slurm")
    assert good.returncode == 0, good.stderr
    run_id = good.stdout.split()[1]
    assert status(zhome, run_id)["backend"] == "slurm"
    shown = zimage("queue").stdout
    assert "launcher: local (ok: this host" in shown.splitlines()[0]
    row = next(ln.split() for ln in shown.splitlines() if run_id in ln)
    assert row[:2] == ["1", run_id] and row[6] == "slurm"  # POS RUN KIND USER STATE PRIORITY ON


def test_a_launcher_whose_extra_is_missing_keeps_its_jobs_queued_saying_why(zhome, monkeypatch):
    from zimage.jobs import backends

    monkeypatch.setitem(backends._EXTRAS, "slurm", "submitit_not_installed_here")
    run_id = enqueue(zhome, "train", {"output_name": "x"}, user="ann")  # follows the home's launcher
    zhome.settings_path.write_text('launcher = "slurm"\n')
    sched = ensure_scheduler(zhome, **FAST)
    assert sched.ready.wait(15)
    why = wait_for(lambda: status(zhome, run_id).get("waiting"), 30, "the reason")
    assert why.startswith("cannot start: backend: the slurm launcher needs the [slurm] extra: pip install")
    assert status(zhome, run_id)["state"] == "queued"


# The sbatch path (submitit's SlurmExecutor, its real sbatch file) against tests/fake_slurm.py's commands


SHORT = {"steps": 3, "interval": 0.05}
WATCHED = {"steps": 20, "interval": 0.25}  # 5 s: past the scheduler's 3 s round of asking the backend


def test_through_sbatch_a_job_runs_to_completed_and_is_watched_by_sacct(zhome, cluster, tmp_path, monkeypatch):
    fake = fake_slurm.install(tmp_path, monkeypatch)
    cluster(executor="slurm", slurm='partition = "debug"\naccount = "vision"')
    run_id = enqueue(zhome, support_worker.KIND, WATCHED, name="batch")
    st = wait_for(lambda: (s := status(zhome, run_id)).get("state") == "completed" and s, 90, "the run completed")
    ((job_id, job),) = wait_for(lambda: [j for j in fake_slurm.jobs(fake).items() if j[1]["state"] != "RUNNING"],
                                30, "the allocation to end")  # fmt: skip
    assert job["state"] == "COMPLETED" and job["name"] == f"zimage-{support_worker.KIND}-{run_id}"
    assert st["backend"] == "slurm" and st["backend_job_id"] == job_id  # the worker saw SLURM_JOB_ID
    assert st["backend_log"] == str(zhome.runs_dir / run_id / "slurm" / f"{job_id}_0_log.out")
    script = Path(job["script"]).read_text()
    assert "#SBATCH --partition=debug" in script and "#SBATCH --account=vision" in script
    calls = (fake / "calls.log").read_text().splitlines()
    assert len([c for c in calls if c.startswith("sbatch ")]) == 1
    assert f"sacct -o JobID,State,NodeList --parsable2 -j {job_id}" in calls  # how the scheduler watched it
    assert (
        st["step"] == 20 and f"submitted to slurm as job {job_id}" in (zhome.runs_dir / run_id / "log.txt").read_text()
    )


def test_a_refused_sbatch_keeps_the_job_queued_with_slurms_words(zhome, cluster, tmp_path, monkeypatch):
    fake = fake_slurm.install(tmp_path, monkeypatch)
    (fake / "sbatch_refuse").write_text("Batch job submission failed: Invalid account or account/partition")
    cluster(executor="slurm")
    run_id = enqueue(zhome, support_worker.KIND, SHORT, name="refused")
    why = wait_for(lambda: status(zhome, run_id).get("waiting"), 30, "the reason")
    assert why.startswith("cannot start: slurm: the job was not submitted:") and "Invalid account" in why
    assert status(zhome, run_id)["state"] == "queued" and not fake_slurm.jobs(fake)


def test_an_sbatch_that_answers_late_is_never_sent_twice(zhome, cluster, tmp_path, monkeypatch):
    from zimage.jobs import dispatch
    from zimage.jobs.backends import slurm

    fake = fake_slurm.install(tmp_path, monkeypatch)
    (fake / "sbatch_delay").write_text("4")  # a slow slurmctld: past the scheduler's wait of 1 s
    monkeypatch.setattr(slurm, "SBATCH_TIMEOUT_S", 1.0)
    monkeypatch.setattr(dispatch, "SUBMIT_BACKOFF_S", 0.5)  # the job is offered again every tick or so
    cluster(executor="slurm")
    run_id = enqueue(zhome, support_worker.KIND, SHORT, name="late")
    why = wait_for(lambda: "not sent again" in (status(zhome, run_id).get("waiting") or "") and
                   status(zhome, run_id)["waiting"], 30, "the reason")  # fmt: skip
    assert "no answer within 1 s" in why and status(zhome, run_id)["state"] == "queued"
    wait_for(lambda: "has not answered yet" in (status(zhome, run_id).get("waiting") or ""), 30,
             "the job offered again while sbatch still runs")  # fmt: skip
    st = wait_for(lambda: (s := status(zhome, run_id)).get("state") == "completed" and s, 90, "the run completed")
    ((job_id, job),) = fake_slurm.jobs(fake).items()  # one job: the late answer was taken, not a second sbatch
    assert st["backend_job_id"] == job_id
    assert len([c for c in (fake / "calls.log").read_text().splitlines() if c.startswith("sbatch")]) == 1


def test_a_job_slurm_loses_is_lost_and_a_stop_it_ignores_goes_through_scancel(zhome, cluster, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    fake = fake_slurm.install(tmp_path, monkeypatch)
    cluster(executor="slurm", scheduler="stop_grace_s = 1\nheartbeat_timeout_s = 600")
    deaf, dies = (enqueue(zhome, support_worker.KIND, LONG, name=n) for n in ("deaf", "dies"))
    wait_for(lambda: running(zhome, [deaf, dies]) == [deaf, dies], 90, "both runs running")
    jobs = {j["name"].removeprefix(f"zimage-{support_worker.KIND}-"): (i, j) for i, j in fake_slurm.jobs(fake).items()}

    with stopped_while_deaf(zhome, deaf):
        job_id = jobs[deaf][0]
        assert f"scancel {job_id}" in (fake / "calls.log").read_text()
        assert fake_slurm.jobs(fake)[job_id]["state"] == "CANCELLED"

    job_id, job = jobs[dies]
    os.killpg(job["pid"], signal.SIGKILL)  # the node goes: the allocation and the worker in it
    st = wait_for(lambda: (s := status(zhome, dies)).get("state") == "lost" and s, 30, "the run lost")
    assert f"the slurm job {job_id} ended (Slurm: NODE_FAIL) without the worker writing a final state" in st["error"]


def test_a_late_sbatch_for_a_run_cancelled_meanwhile_has_its_job_cancelled(zhome, cluster, tmp_path, monkeypatch):
    from zimage.jobs import cancel, dispatch
    from zimage.jobs.backends import slurm

    fake = fake_slurm.install(tmp_path, monkeypatch)
    (fake / "sbatch_delay").write_text("3")
    monkeypatch.setattr(slurm, "SBATCH_TIMEOUT_S", 0.5)
    monkeypatch.setattr(dispatch, "SUBMIT_BACKOFF_S", 60.0)  # not offered again: the run is cancelled first
    cluster(executor="slurm")
    run_id = enqueue(zhome, support_worker.KIND, LONG, name="changed-mind")
    wait_for(lambda: "not sent again" in (status(zhome, run_id).get("waiting") or ""), 30, "the sbatch past its wait")
    cancel(zhome, run_id)  # the person takes the job out of the line while sbatch still works
    ((job_id, _),) = wait_for(lambda: [j for j in fake_slurm.jobs(fake).items() if j[1]["state"] == "CANCELLED"], 30,
                              "the late job cancelled")  # fmt: skip
    assert f"scancel {job_id}" in (fake / "calls.log").read_text()
    wait_for(lambda: "a late submission's job was cancelled" in (zhome.runs_dir / run_id / "log.txt").read_text(),
             10, "the run's log to say so")  # fmt: skip
    st = status(zhome, run_id)
    assert st["state"] == "stopped" and st.get("cancelled") is True and not st.get("backend_job_id")


def test_a_late_sbatch_whose_worker_starts_before_any_resend_is_watched_not_cancelled(zhome, cluster, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    from zimage.jobs import dispatch
    from zimage.jobs.backends import slurm

    fake = fake_slurm.install(tmp_path, monkeypatch)
    (fake / "sbatch_delay").write_text("2")
    monkeypatch.setattr(slurm, "SBATCH_TIMEOUT_S", 0.5)
    monkeypatch.setattr(dispatch, "SUBMIT_BACKOFF_S", 600.0)  # never offered again: the late job's worker wins
    cluster(executor="slurm")
    run_id = enqueue(zhome, support_worker.KIND, WATCHED, name="won")
    wait_for(lambda: "not sent again" in (status(zhome, run_id).get("waiting") or ""), 30, "the sbatch past its wait")
    st = wait_for(lambda: (s := status(zhome, run_id)).get("state") == "completed" and s, 90, "the run completed")
    ((job_id, job),) = fake_slurm.jobs(fake).items()
    assert st["backend"] == "slurm" and st["backend_job_id"] == job_id  # the worker named its job
    assert job["state"] != "CANCELLED" and "scancel" not in (fake / "calls.log").read_text()
