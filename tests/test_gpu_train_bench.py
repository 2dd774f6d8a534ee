"""benchmarks/gpu_train.py --tiny runs the trainer's own code path (setup, train_step) and prints every column."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_train_bench", ROOT / "benchmarks" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_tiny_run_prints_every_column_per_case(bench, capsys):
    assert bench.main(["--tiny", "--steps", "2", "--cases", "bf16-256,nf4-256"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("case bf16-256 ")]
    assert len(rows) == 1, out
    cells = rows[0].split(" | ")
    assert [c for c, cell in zip(bench.COLUMNS, cells, strict=True) if cell.startswith(c + " ")] == list(bench.COLUMNS)
    assert "estimate 0.0" in rows[0] and "FLOP (" in rows[0]
    assert float(rows[0].split("s/step ")[1].split(" ")[0]) > 0
    assert "nf4-256: skipped (bitsandbytes quantized loading needs CUDA)" in out
    assert "0 case(s) failed" in out


def test_a_broken_train_step_fails_the_case_and_the_next_case_runs(bench, capsys, monkeypatch):
    from zimage.training.trainer import LoraTrainer

    real = LoraTrainer.train_step
    calls = []

    def broken(self):
        calls.append(self.config.resolution)
        if self.config.resolution == 256:
            raise RuntimeError("the step is broken")
        return real(self)

    monkeypatch.setattr(LoraTrainer, "train_step", broken)
    assert bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--cases", "bf16-256,bf16-512"]) == 1
    out = capsys.readouterr().out
    assert "bf16-256: failed: RuntimeError: the step is broken" in out
    assert any(line.startswith("case bf16-512 | s/step ") for line in out.splitlines()), out
    assert calls == [256, 512]  # the benchmark's steps are the trainer's train_step
