"""`zimage queue add --dry-run`: the config is checked and what the launcher would be sent is printed (the
sbatch file, the Ray job, the local command), and nothing is queued or written. Through the real CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="needs the [slurm] extra")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the [ray] extra")


def zimage(home, *args):
    return subprocess.run([sys.executable, "-m", "zimage.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, ZIMAGE_HOME=str(home)), timeout=120)  # fmt: skip


def nothing_written(settings) -> bool:
    return not any(settings.runs_dir.iterdir())


@pytest.fixture()
def train_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_path: tiny-zimage\ndataset_path: demo-shapes\nresolution: 256\n")
    return path


@needs_submitit
def test_the_sbatch_file_of_a_two_gpu_run_is_printed_and_nothing_is_queued(zhome_demo, train_yaml):
    zhome_demo.settings_path.write_text(
        'launcher = "slurm"\n[slurm]\npartition = "gpu"\naccount = "vision"\ngpus_per_node = 4\n'
        'setup = ["module load cuda/12.4"]\nsbatch = { constraint = "h100" }\n'
    )
    out = zimage(zhome_demo.home, "queue", "add", str(train_yaml), "--preset", "quick_test", "--gpus", "2",
                 "--dry-run")  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("dry run: the config is valid; nothing was queued") and lines[0].endswith("slurm")
    for option in ("--gpus-per-node=2", "--nodes=1", "--ntasks-per-node=1", "--partition=gpu", "--account=vision",
                   "--constraint=h100", "--time=1440", "--job-name=zimage-train-RUN_ID"):  # fmt: skip
        assert f"#SBATCH {option}" in lines, option
    assert "module load cuda/12.4" in lines
    task = next(ln for ln in lines if ln.startswith("the task runs"))
    assert f"ZIMAGE_HOME={zhome_demo.home}" in task and "ZIMAGE_BACKEND=slurm" in task
    assert task.endswith(f"-m zimage.jobs.ranks --nproc-per-node 2 --run-dir {zhome_demo.runs_dir / 'RUN_ID'}")
    assert nothing_written(zhome_demo)

    # More GPUs than one node may have: printed, then refused with the reason and exit 2 (queued, it would fail).
    big = zimage(zhome_demo.home, "queue", "add", str(train_yaml), "--preset", "quick_test", "--gpus", "8",
                 "--dry-run")  # fmt: skip
    assert big.returncode == 2
    assert "error: queued, it would fail at its turn: needs 8 GPUs; [slurm] gpus_per_node allows 4 per job" in big.stderr
    # A bad config is refused before anything is printed, naming the field.
    bad = zimage(zhome_demo.home, "queue", "add", str(train_yaml), "--preset", "quick_test", "--set",
                 "learning_rate=-1", "--dry-run")  # fmt: skip
    assert bad.returncode != 0 and "learning_rate" in bad.stderr and "Traceback" not in bad.stderr
    assert "dry run" not in bad.stdout
    assert nothing_written(zhome_demo)


def test_the_local_command_and_bad_arguments(zhome, tmp_path):
    cfg = tmp_path / "caption.json"
    cfg.write_text(json.dumps({"dataset": "none-yet"}))
    out = zimage(zhome.home, "queue", "add", str(cfg), "--kind", "caption", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].endswith("Launcher: local")
    assert f"-m zimage.cli caption --run-dir {zhome.runs_dir / 'RUN_ID'}" in out.stdout
    for args, words in ((["--backend", "pbs"], "--backend: 'pbs' is not a launcher; allowed: local, ray, slurm"),
                        (["--gpus", "0"], "--gpus: 0 must be a whole number of at least 1"),
                        (["--kind", "render"], "--kind: 'render' is not a job kind")):  # fmt: skip
        bad = zimage(zhome.home, "queue", "add", str(cfg), "--kind", "caption", "--dry-run", *args)
        assert bad.returncode == 2 and words in bad.stderr, (args, bad.stderr)
        assert "Traceback" not in bad.stderr
    assert nothing_written(zhome)


@needs_ray
def test_the_ray_job_says_what_it_asks_for_even_when_the_cluster_is_down(zhome, tmp_path):
    cfg = tmp_path / "caption.json"
    cfg.write_text(json.dumps({"dataset": "none-yet"}))
    zhome.settings_path.write_text('launcher = "ray"\n')
    env_free = zimage(zhome.home, "queue", "add", str(cfg), "--kind", "caption", "--dry-run")
    assert env_free.returncode == 2 and "ray: no address: set [ray] address in settings.toml" in env_free.stderr
    assert "dry run" not in env_free.stdout

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    zhome.settings_path.write_text(f'launcher = "ray"\n[ray]\naddress = "http://127.0.0.1:{port}"\n'
                                   'python = "/shared/venv/bin/python"\ncpus_per_job = 2\n')  # fmt: skip
    out = zimage(zhome.home, "queue", "add", str(cfg), "--kind", "caption", "--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "  submission id: zimage-RUN_ID-MS" in text
    assert f"  entrypoint: /shared/venv/bin/python -m zimage.cli caption --run-dir {zhome.runs_dir / 'RUN_ID'} >>" in text
    resources = next(ln for ln in text.splitlines() if ln.startswith("  resources:"))
    assert resources.startswith("  resources: entrypoint_num_gpus=1 (ray: cannot reach the cluster at")
    assert resources.endswith("on a cluster without GPUs: entrypoint_num_cpus=2)")
    assert f"ZIMAGE_HOME={zhome.home}" in text and "ZIMAGE_BACKEND=ray" in text
    assert nothing_written(zhome)
