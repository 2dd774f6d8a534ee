"""benchmarks/gpu_check.sh on a machine without CUDA: an environment report and a clear skip, in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_on_a_cpu_host_reports_and_skips(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA host runs the whole check (minutes): run benchmarks/gpu_check.sh by hand")
    log = tmp_path / "check.log"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--log", str(log), "--wheels",
                           str(wheels)], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = log.read_text()
    for expected in ("== driver ==", "== python packages ==", "torch          " + torch.__version__,
                     f"SKIPPED: no .whl files in {wheels}", "no CUDA: skipped"):  # fmt: skip
        assert expected in text, text
    assert "pytest -m gpu ==" not in text  # nothing after the skip ran
    assert "no CUDA: skipped" in proc.stdout
