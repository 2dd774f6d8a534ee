"""The trainer's lean single-process step: flat gradients and fused AdamW give the same training as the
general path through accelerate's accumulate() / backward() and torch's clip_grad_norm_."""

from __future__ import annotations

import math

import pytest
import torch
from train_support import fast_config, make_home

from zimage.config import MachineInfo, build_config, validate_config
from zimage.training.optim import FlatGradients, build_optimizer
from zimage.training.trainer import LoraTrainer

CPU = MachineInfo(cuda=False, bf16=True)


def _params_with_grads(seed: int, scale: float) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in [(4, 8), (8, 4), (3,), (2, 5)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    return params


@pytest.mark.parametrize("max_norm", [0.5, 100.0, math.inf])
def test_flat_clipping_matches_torch(max_norm):
    """Norm and scaled gradients equal torch.nn.utils.clip_grad_norm_ on the same gradients."""
    reference = _params_with_grads(0, 3.0)
    expected_norm = torch.nn.utils.clip_grad_norm_(reference, max_norm)

    params = _params_with_grads(0, 3.0)
    grads = [p.grad.clone() for p in params]
    flat = FlatGradients(params)
    flat.attach()  # the old gradients are dropped: attach starts from zero, as before a backward
    assert all(float(p.grad.abs().sum()) == 0.0 for p in params)
    for p, g in zip(params, grads, strict=True):
        p.grad.add_(g)  # what autograd does with a gradient that already exists
    norm = flat.clip_(max_norm)

    assert float(norm) == pytest.approx(float(expected_norm), rel=1e-6)
    for p, ref in zip(params, reference, strict=True):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=1e-7)


def test_backward_fills_the_flat_buffer_and_attach_repairs_dropped_gradients():
    layer = torch.nn.Linear(6, 3)
    params = list(layer.parameters())
    flat = FlatGradients(params)
    flat.attach()
    x = torch.randn(5, 6)
    layer(x).square().sum().backward()
    expected = torch.autograd.grad(layer(x).square().sum(), params)
    for p, view, g in zip(params, flat.views, expected, strict=True):
        assert p.grad is view and p.grad.data_ptr() >= flat.buffer.data_ptr()
        torch.testing.assert_close(p.grad, g)
    assert float(torch.linalg.vector_norm(flat.buffer)) > 0

    flat.zero_()
    assert float(flat.buffer.abs().sum()) == 0.0
    layer.zero_grad(set_to_none=True)  # anything that drops the gradients ...
    flat.attach()  # ... is repaired before the next backward
    assert all(p.grad is view for p, view in zip(params, flat.views, strict=True))


def test_flat_gradients_only_for_one_dtype_and_a_lora_sized_set():
    assert FlatGradients.fits([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))])
    assert not FlatGradients.fits([])
    mixed = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    assert not FlatGradients.fits(mixed)


def test_adamw_uses_the_fused_kernel_on_the_cpu():
    optimizer = build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(4))], 1e-3)
    assert optimizer.defaults["fused"] is True


def _train(settings, general: bool, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    config = fast_config(num_steps=steps, max_grad_norm=0.05, learning_rate=5e-3, output_name=f"fast{int(general)}")
    trainer = LoraTrainer(validate_config(build_config(config), settings, CPU), settings)
    trainer.setup()
    assert trainer._lean and trainer.stepper.flat is not None  # this config takes the lean path by default
    if general:  # accelerate's accumulate() + backward() and torch's clip_grad_norm_, as multi-GPU runs do
        trainer._lean, trainer.stepper.flat = False, None
    norms = []
    for _ in range(steps):
        loss, norm = trainer.train_step()
        trainer.step += 1
        norms.append((loss, norm))
    weights = {name: p.detach().clone() for name, p in trainer.transformer.named_parameters() if p.requires_grad}
    trainer.cleanup()
    return norms, weights


def test_the_lean_step_trains_exactly_like_the_general_one(tmp_path, tiny_model_dir):
    settings = make_home(tmp_path / "home", tiny_model_dir)
    lean, lean_weights = _train(settings, general=False)
    general, general_weights = _train(settings, general=True)
    assert all(norm > 0.05 for _, norm in general)  # max_grad_norm 0.05 clips every step: both clip paths ran
    for (loss_a, norm_a), (loss_b, norm_b) in zip(lean, general, strict=True):
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
        assert norm_a == pytest.approx(norm_b, rel=1e-5)
    assert lean_weights.keys() == general_weights.keys() and lean_weights
    for name, value in lean_weights.items():
        torch.testing.assert_close(value, general_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_overhead_benchmark_runs_end_to_end():
    """benchmarks/train_overhead.py (issue 3's figures) on a few steps: it runs and prints sane numbers."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_overhead.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(script), "--steps", "6", "--block", "3", "--resolution", "256"],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = re.search(r"warm/cold ([\d.]+)", proc.stdout)
    ratio = re.search(
        r"256 px: trainer [\d.]+ steps/s .* ratio ([\d.]+) \(target >= 0.95; median of 2 block", proc.stdout
    )
    assert first and ratio, proc.stdout
    assert 0 < float(first.group(1)) < 1 and 0.3 < float(ratio.group(1)) < 3
    assert "encoded latents=0 captions=0, loaded vae=False text_encoder=False" in proc.stdout
