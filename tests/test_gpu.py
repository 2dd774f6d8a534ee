"""The GPU path (`pytest -m gpu`; skipped without CUDA, as in CI): the tiny model trained on CUDA.

CPU twins of the same logic run in the default suite: test_train.py (a run end to end), test_resume.py
(exact resume), test_adapter.py (sampling with the adapter reversed), test_lora_io.py (a LoRA loads in
diffusers), test_multigpu.py / test_torchrun_jobs.py (2 ranks under torchrun, gloo). These run it on CUDA
in bf16 and with bitsandbytes, which the CPU cannot. benchmarks/gpu_check.sh runs them on a GPU host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_support import fast_config, make_home

from zimage.config import build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training.runner import run_training

CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if CUDA else 0
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return make_home(tmp_path_factory.mktemp("gpu") / "home", tiny_model_dir)


def train(home, run_dir: Path, **config) -> tuple[int, RunFolder, object]:
    resolved = validate_config(build_config(fast_config(**config)), home)
    run = RunFolder(run_dir)
    run.write_config(resolved.config.to_dict())
    return run_training(resolved, home, run.path), run, resolved


def losses(run: RunFolder) -> dict[int, float]:
    out = {}
    for line in run.metrics_path.read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def test_twenty_bf16_steps_on_cuda_lower_the_loss(home, tmp_path):
    code, run, resolved = train(home, tmp_path / "run", num_steps=20, mixed_precision="bf16", learning_rate=2e-3,
                                lora_rank=8, lora_alpha=8, output_name="cuda-bf16", seed=3)  # fmt: skip
    assert code == 0, run.read_status().get("error")
    assert "on cuda" in run.log_path.read_text()
    got = losses(run)
    assert sorted(got) == list(range(1, 21))
    first, last = sum(got[s] for s in range(1, 6)) / 5, sum(got[s] for s in range(16, 21)) / 5
    assert last < first, got
    assert resolved.output_path.exists()


def test_resume_on_cuda_continues_within_1e_3_of_an_unbroken_run(home, tmp_path):
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        common = dict(
            num_steps=8, save_every_n_steps=2, mixed_precision="bf16", seed=5, timestep_sampling="logit_normal"
        )
        code, straight, _ = train(home, tmp_path / "straight", output_name="cuda-straight", **common)
        assert code == 0
        resolved = validate_config(build_config(fast_config(output_name="cuda-resumed", **common)), home)
        run = RunFolder(tmp_path / "resumed")
        run.write_config(resolved.config.to_dict())

        def stop_at_3(record):
            if record["step"] == 3:
                run.send_control("stop")

        assert run_training(resolved, home, run.path, on_step=stop_at_3) == 0
        assert run.read_status()["state"] == "stopped"
        assert run_training(resolved, home, run.path, resume=True) == 0
        assert run.read_status()["resumed_from_step"] == 3
        want, got = losses(straight), losses(run)
        assert sorted(got) == list(range(1, 9))
        for step in range(1, 9):
            assert abs(got[step] - want[step]) <= 1e-3, (step, got[step], want[step])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("quantize", ["8bit", "nf4"])
def test_a_quantized_base_trains_and_its_lora_loads_in_diffusers(home, tmp_path, quantize, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from diffusers import ZImagePipeline

    code, run, resolved = train(home, tmp_path / "run", num_steps=4, mixed_precision="bf16", quantize=quantize,
                                output_name=f"cuda-{quantize}")  # fmt: skip
    assert code == 0, run.read_status().get("error")
    assert ("NF4" if quantize == "nf4" else "8-bit") in run.log_path.read_text()
    with safe_open(str(resolved.output_path), framework="pt") as fh:
        assert any(k.startswith("diffusion_model.layers.0.attention.to_q.lora_A") for k in fh.keys())  # noqa: SIM118
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.bfloat16).to("cuda")
    pipe.load_lora_weights(str(resolved.output_path))
    assert pipe.transformer.active_adapters()


def test_sampling_with_the_adapter_reversed_on_cuda(tiny_model_dir, tmp_path):
    """test_adapter.py's check on CUDA: sampling = base + the user's LoRA, the adapter taken out at -1."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from test_adapter import _modules, write_styles

    from zimage.training import lora_io, zimage_math
    from zimage.training.adapter import adapter_reversed, merge_adapter

    files = write_styles(tmp_path, _modules(zimage_math.load_transformer(tiny_model_dir)))
    model = zimage_math.load_transformer(tiny_model_dir).to("cuda")
    merge_adapter(model, files["diffusion_model"])
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=r"^layers\.\d+\.(attention\.to_[qv]|feed_forward\.w2)$")
    )
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.2).to(p.device))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=gen).cuda()
    text = [torch.randn(7, 32, generator=gen).cuda()]
    sigma = torch.tensor([0.6], device="cuda")
    with torch.no_grad(), adapter_reversed(model, lora_io.read_lora(files["kohya"])):
        sampled = zimage_math.predict(model, x, sigma, text)
    user = lora_io.save_lora(tmp_path / "user.safetensors", lora_io.modules_from_peft(
        get_peft_model_state_dict(model, adapter_name="default"), 8.0), dtype=torch.float32)  # fmt: skip
    reference = zimage_math.load_transformer(tiny_model_dir).to("cuda")
    lora_io.load_into_transformer(reference, user, "user")
    with torch.no_grad():
        want = zimage_math.predict(reference, x, sigma, text)
    assert sampled.is_cuda and torch.allclose(sampled, want, atol=1e-4)


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_a_two_gpu_torchrun_job_trains_on_both(home, tmp_path):
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps(fast_config(num_steps=4, mixed_precision="bf16", output_name="cuda-ddp")))
    run_dir = home.runs_dir / "cuda-ddp-run"
    env = dict(os.environ, ZIMAGE_HOME=str(home.home), CUDA_VISIBLE_DEVICES="0,1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zimage.cli",
           "train", str(config), "--run-dir", str(run_dir)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = RunFolder(run_dir).log_path.read_text()
    assert "identical on all 2 processes" in log and "2 images/step" in log and "on cuda" in log
