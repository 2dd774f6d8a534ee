"""Optimizers by name: the fused AdamW, the probe validation uses, and the names importable without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from zimage.optimizers import OPTIMIZERS, available_optimizers, build_optimizer, optimizer_problem


def test_adamw_uses_the_fused_kernel_on_the_cpu():
    optimizer = build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(4))], 1e-3)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


def test_the_probe_runs_each_optimizer_and_names_unknown_ones():
    found = available_optimizers("cpu")
    assert list(found) == list(OPTIMIZERS)
    assert found["adamw"] is None and found["adamw8bit"] is None  # bitsandbytes 8-bit AdamW runs on the CPU
    assert "unknown optimizer" in optimizer_problem("sgd9000")
    with pytest.raises(ValueError, match="choose one of adamw, adamw8bit"):
        build_optimizer("sgd9000", [torch.nn.Parameter(torch.zeros(1))], 1e-3)


def test_the_names_load_without_torch():
    code = "import sys, zimage.optimizers as o; print(o.OPTIMIZERS, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "('adamw', 'adamw8bit', 'adafactor', 'prodigy') False"
