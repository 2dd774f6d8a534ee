"""A one-host stand-in for Slurm's commands (sbatch, srun, sacct, squeue, scancel, sinfo), so the slurm
launcher's sbatch path runs here end to end: submitit's SlurmExecutor writes its real sbatch file, "sbatch"
runs that file as a detached process with the SLURM_* variables a one-task allocation has, and the
scheduler watches it with sacct and cancels it with scancel, as on a cluster.

It is a test tool, not Slurm: one node, no queueing, no limits. What a test needs to steer:
    FAKE_SLURM_DIR/sbatch_delay   seconds every sbatch sleeps before it submits (a slow slurmctld)
    FAKE_SLURM_DIR/sbatch_refuse  a message sbatch prints to stderr before exiting 1 (a refused job)
    FAKE_SLURM_DIR/calls.log      one line per command called, with its arguments
Jobs live in FAKE_SLURM_DIR/jobs/<id>.json: name, pid, state.

`install(tmp_path, monkeypatch)` puts the commands first on PATH and returns FAKE_SLURM_DIR.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "squeue", "scancel", "sinfo")


def install(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "fake-slurm"
    bin_dir = root / "bin"
    (root / "jobs").mkdir(parents=True)
    bin_dir.mkdir()
    for name in COMMANDS:
        tool = bin_dir / name
        tool.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} {name} "$@"\n')
        tool.chmod(0o755)
    monkeypatch.setenv("FAKE_SLURM_DIR", str(root))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return root


def jobs(root: Path) -> dict[str, dict]:
    """job id -> its record, for a test's checks."""
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "jobs").glob("*.json"))}


def _root() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def _job_path(job_id: str) -> Path:
    return _root() / "jobs" / f"{job_id}.json"


def _save(job_id: str, record: dict) -> None:
    tmp = _job_path(job_id).with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, _job_path(job_id))


def _load(job_id: str) -> dict | None:
    try:
        return json.loads(_job_path(job_id).read_text())
    except (OSError, ValueError):
        return None


def _new_id() -> str:
    """The next job id: an O_EXCL marker file per id, so two sbatch calls never share one."""
    n = 1000
    while True:
        n += 1
        try:
            os.close(os.open(_root() / "jobs" / f"{n}.id", os.O_CREAT | os.O_EXCL))
            return str(n)
        except FileExistsError:
            continue


def _option(text: str, key: str) -> str | None:
    found = re.search(rf"^#SBATCH --{key}=(.*)$", text, re.M)
    return found.group(1).strip() if found else None


def sbatch(args: list[str]) -> int:
    root = _root()
    delay = root / "sbatch_delay"
    if delay.exists():
        time.sleep(float(delay.read_text()))
    refuse = root / "sbatch_refuse"
    if refuse.exists():
        print(f"sbatch: error: {refuse.read_text().strip()}", file=sys.stderr)
        return 1
    script = Path(args[-1])
    text = script.read_text()
    job_id = _new_id()
    name = _option(text, "job-name") or script.name
    out = (_option(text, "output") or f"slurm-{job_id}.out").replace("%j", job_id).replace("%t", "0")
    env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_JOB_NAME": name, "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost"}  # fmt: skip
    _save(job_id, {"name": name, "state": "PENDING", "pid": None, "script": str(script)})
    runner = subprocess.Popen([sys.executable, __file__, "_run", job_id, str(script), out], env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    _save(job_id, {"name": name, "state": "RUNNING", "pid": runner.pid, "script": str(script)})
    print(f"Submitted batch job {job_id}")
    return 0


def _run(job_id: str, script: str, out: str) -> int:
    """The allocation: the batch script with its output where #SBATCH --output says; then its final state."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "ab") as log:
        rc = subprocess.call(["bash", script], stdout=log, stderr=subprocess.STDOUT)
    record = _load(job_id) or {}
    if record.get("state") != "CANCELLED":
        record["state"] = "COMPLETED" if rc == 0 else "FAILED"
        _save(job_id, record)
    return rc


def srun(args: list[str]) -> int:
    """The one task: its --output/--error files (with %j and %t filled in), then the command itself."""
    job_id = os.environ.get("SLURM_JOB_ID", "0")
    files: dict[str, str] = {}
    while args and args[0].startswith("-"):
        flag = args.pop(0)
        if flag in ("--output", "--error", "-o", "-e"):
            files[flag.lstrip("-")[0]] = args.pop(0).replace("%j", job_id).replace("%t", "0")
    stdout = open(files["o"], "ab") if "o" in files else None  # noqa: SIM115
    stderr = open(files["e"], "ab") if "e" in files else subprocess.STDOUT if stdout else None  # noqa: SIM115
    return subprocess.call(args, stdout=stdout, stderr=stderr)


def _state(job_id: str) -> str:
    record = _load(job_id)
    if record is None:
        return ""
    if record["state"] == "RUNNING" and record.get("pid"):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:  # the runner died without a word (killed by hand): as Slurm says of that
            return "NODE_FAIL"
    return record["state"]


def sacct(args: list[str]) -> int:
    ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for job_id in ids:
        if state := _state(job_id):
            print(f"{job_id}|{state}|localhost")
    return 0


def squeue(args: list[str]) -> int:
    names = {a.split("=", 1)[1] for a in args if a.startswith("--name=")}
    for i, a in enumerate(args):
        if a in ("-n", "--name") and i + 1 < len(args):
            names.add(args[i + 1])
    for path in sorted((_root() / "jobs").glob("*.json")):
        record = json.loads(path.read_text())
        if _state(path.stem) in ("PENDING", "RUNNING") and (not names or record["name"] in names):
            print(path.stem)
    return 0


def scancel(args: list[str]) -> int:
    sig = signal.SIGTERM
    for a in args:
        if a.startswith("--signal="):
            sig = getattr(signal, f"SIG{a.split('=', 1)[1].removeprefix('SIG')}")
    for job_id in (a for a in args if not a.startswith("-")):
        record = _load(job_id)
        if record is None or record["state"] not in ("PENDING", "RUNNING"):
            continue
        if sig == signal.SIGTERM:
            record["state"] = "CANCELLED"
            _save(job_id, record)
        try:
            os.killpg(record["pid"], sig)
        except ProcessLookupError:
            pass
    return 0


def sinfo(args: list[str]) -> int:
    print("debug up 1 idle")
    return 0


def main(argv: list[str]) -> int:
    name, args = argv[0], argv[1:]
    if name == "_run":
        return _run(*args)
    with open(_root() / "calls.log", "a") as calls:
        calls.write(shlex.join([name, *args]) + "\n")
    return {"sbatch": sbatch, "srun": srun, "sacct": sacct, "squeue": squeue, "scancel": scancel,
            "sinfo": sinfo}[name](args)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
