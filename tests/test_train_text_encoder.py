"""train_text_encoder: a LoRA on the text encoder too, embeddings computed every step, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from shared_cache import home_with_shared_cache
from train_support import fast_config, one_thread_per_module  # noqa: F401 - autouse

from zimage.cli import main
from zimage.config import build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training.runner import run_training
from zimage.training.text_lora import text_encoder_lora_path

TE = dict(
    train_text_encoder=True, gradient_checkpointing=True, num_steps=4, learning_rate=2e-2, caption_dropout=0.25,
    save_every_n_steps=2, sample_every_n_steps=4, sample_resolution=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return home_with_shared_cache(tmp_path_factory, tiny_model_dir, "te")


def _losses(run: RunFolder) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, run.metrics_path.read_text().splitlines())}


@pytest.fixture(scope="module")
def te_run(home, tmp_path_factory):
    resolved = validate_config(build_config(fast_config(**TE, output_name="te")), home)
    run = RunFolder(tmp_path_factory.mktemp("te") / "run")
    run.write_config(resolved.config.to_dict())
    assert run_training(resolved, home, run.path) == 0, run.read_status().get("traceback")
    return resolved, run


def test_validation_warns_that_text_embeddings_cannot_be_cached(te_run):
    resolved, run = te_run
    assert any("text embeddings cannot be cached" in w for w in resolved.warnings)
    log = run.log_path.read_text()
    assert "Note: train_text_encoder: text embeddings cannot be cached" in log
    assert "Text encoder LoRA:" in log and "All 0 caption embeddings" in log  # nothing taken from the cache


def test_both_loras_are_saved_and_the_text_encoder_one_trained(te_run):
    resolved, run = te_run
    te_file = text_encoder_lora_path(resolved.output_path)
    assert resolved.output_path.is_file() and te_file.name == "te.text_encoder.safetensors"
    with safe_open(str(te_file), framework="pt") as fh:
        keys = list(fh.keys())  # noqa: SIM118
        up = fh.get_tensor("text_encoder.layers.0.self_attn.q_proj.lora_B.weight")
        assert fh.metadata()["part"] == "text_encoder" and fh.metadata()["steps"] == "4"
    assert up.abs().sum() > 0  # it trained
    assert all(k.startswith("text_encoder.layers.0.") for k in keys)  # layer 1's output is never used: no LoRA
    with safe_open(str(resolved.output_path), framework="pt") as fh:
        assert all(k.startswith("diffusion_model.") for k in fh.keys())  # noqa: SIM118 - loads in diffusers as before
    samples = [json.loads(x) for x in run.samples_path.read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 4]


def test_resume_with_the_text_encoder_lora_is_exact(home, te_run, tmp_path, monkeypatch):
    _, straight = te_run
    resolved = validate_config(build_config(fast_config(**TE, output_name="te-stopped")), home)
    run = RunFolder(tmp_path / "run")
    run.write_config(resolved.config.to_dict())

    def on_step(record):
        if record["step"] == 3:
            run.send_control("stop")

    assert run_training(resolved, home, run.path, on_step=on_step) == 0
    assert (run.checkpoints_dir / "step-000003" / "text_encoder_lora.safetensors").is_file()
    monkeypatch.setenv("ZIMAGE_HOME", str(home.home))
    assert main(["train", "--resume", str(run.path)]) == 0
    want, got = _losses(straight), _losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
    a = safe_open(str(text_encoder_lora_path(resolved.output_path)), framework="pt")
    b = safe_open(str(text_encoder_lora_path(te_run[0].output_path)), framework="pt")
    for key in a.keys():  # noqa: SIM118
        assert torch.allclose(a.get_tensor(key).float(), b.get_tensor(key).float(), atol=1e-5), key
