"""The trainer end to end on the tiny model: one shared run, its LoRA file, caches, and an overfit check."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from train_support import fast_config, make_home, one_thread_per_module  # noqa: F401 - autouse

from zimage.config import MachineInfo, build_config, validate_config
from zimage.data.folders import DatasetFolder, DatasetInfo
from zimage.runfolder import METRIC_FIELDS, RunFolder
from zimage.training.reporting import Reporter
from zimage.training.trainer import LoraTrainer

CPU = MachineInfo(cuda=False, bf16=True)
RANK, ALPHA, STEPS = 4, 8.0, 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One training run shared by the tests below; the trainer (and its in-memory LoRA) stays alive."""
    root = tmp_path_factory.mktemp("train")
    settings = make_home(root / "home", tiny_model_dir)
    config = fast_config(
        lora_rank=RANK,
        lora_alpha=ALPHA,
        num_steps=STEPS,
        learning_rate=5e-3,
        batch_size=2,
        gradient_accumulation=2,
        lr_scheduler="cosine",
        lr_warmup_steps=4,
        caption_dropout=0.2,
        gradient_checkpointing=True,
        log_every_n_steps=2,
    )
    resolved = validate_config(build_config(config), settings, CPU)
    run = RunFolder(root / "run")
    trainer = LoraTrainer(resolved, settings, Reporter(run))
    trainer.setup()
    result = trainer.train()
    yield SimpleNamespace(settings=settings, resolved=resolved, run=run, trainer=trainer, result=result)
    trainer.cleanup()


def test_run_completes_and_writes_the_lora(trained):
    r = trained.result
    assert r.state == "completed" and r.steps == STEPS
    assert r.output_path == trained.settings.loras_dir / "test_lora.safetensors" and r.output_path.exists()
    assert trained.trainer.cache_stats.latents_encoded == 16 and trained.trainer.cache_stats.text_encoded == 17


def test_lora_keys_and_metadata(trained):
    with safe_open(str(trained.result.output_path), framework="pt") as fh:
        keys, meta = list(fh.keys()), fh.metadata()
        alphas = [float(fh.get_tensor(k)) for k in keys if k.endswith(".alpha")]
        a = fh.get_tensor("diffusion_model.layers.0.attention.to_q.lora_A.weight")
        b = fh.get_tensor("diffusion_model.layers.1.feed_forward.w2.lora_B.weight")
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    expected = {
        f"diffusion_model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    }  # fmt: skip
    assert modules == expected and len(keys) == 3 * len(expected)
    assert not any("qkv" in k or "refiner" in k or "adaLN" in k for k in keys)
    assert alphas == [ALPHA] * len(expected)
    assert a.shape == (RANK, 32) and a.dtype == torch.float32 and b.shape == (32, RANK)
    assert b.abs().sum() > 0  # lora_B starts at zero; training moved it
    assert meta["base_model"] == "tiny-zimage" and meta["base_model_type"] == "de_turbo"
    assert meta["trigger_word"] == "zshape" and meta["dataset_name"] == "demo-shapes"
    assert meta["lora_rank"] == str(RANK) and meta["lora_alpha"] == "8" and meta["steps"] == str(STEPS)
    assert meta["software"] == "zimage-lora-studio" and meta["software_version"]
    assert meta["dataset_hash"] == trained.trainer.training_set.content_hash and len(meta["dataset_hash"]) == 64
    assert json.loads(meta["training_config"])["lora_alpha"] == ALPHA


def _generate(pipe, seed=7):
    return pipe(
        "zshape, a red circle",
        height=128,
        width=128,
        num_inference_steps=3,
        guidance_scale=0.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    ).images


def test_loaded_lora_reproduces_the_trainers_in_memory_output(trained):
    from diffusers import ZImagePipeline

    model_dir = trained.resolved.model_dir
    in_memory = trained.trainer.accelerator.unwrap_model(trained.trainer.transformer)
    in_memory.eval()
    with torch.no_grad():
        ours = _generate(ZImagePipeline.from_pretrained(model_dir, transformer=in_memory))
    fresh = ZImagePipeline.from_pretrained(model_dir)
    base = _generate(fresh)
    fresh.load_lora_weights(str(trained.result.output_path))
    loaded = _generate(fresh)
    assert torch.isfinite(loaded).all()
    assert (loaded - base).abs().max() > 1e-3, "the LoRA changed nothing"
    assert torch.allclose(loaded, ours, atol=1e-5, rtol=1e-5)
    # alpha != rank survived: loading it as if alpha were rank gives another result
    fresh.unload_lora_weights()
    with safe_open(str(trained.result.output_path), framework="pt") as fh:
        no_alpha = {k: fh.get_tensor(k) for k in fh.keys() if not k.endswith(".alpha")}  # noqa: SIM118
    fresh.load_lora_weights(no_alpha)
    assert (_generate(fresh) - ours).abs().max() > 1e-4


def test_metrics_log_and_status(trained):
    lines = [json.loads(line) for line in trained.run.metrics_path.read_text().splitlines()]
    assert [rec["step"] for rec in lines] == list(range(2, STEPS + 1, 2))
    for rec in lines:
        assert set(METRIC_FIELDS) - {"val_loss"} <= set(rec)  # val_loss: only with validation_images
        assert math.isfinite(rec["loss"]) and rec["step_time"] > 0 and rec["mem_allocated"] > 0
        assert rec["samples_per_s"] == pytest.approx(4 / rec["step_time"])  # batch 2 x accumulation 2
    lrs = [rec["lr"] for rec in lines]
    # the rate each step trained with: linear warmup over 4 steps (from 0 at step 1), then cosine to ~0
    assert lrs[0] == pytest.approx(5e-3 * 1 / 4) and lrs[1] == pytest.approx(5e-3 * 3 / 4)
    assert lrs[2] == pytest.approx(5e-3 * 0.5 * (1 + math.cos(math.pi * 1 / (STEPS - 4))))
    assert lrs[-1] < 2.5e-4 and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)
    assert lines[-1]["eta"] == 0.0
    log = trained.run.log_path.read_text()
    assert "Dataset demo-shapes: 16 images, 0 skipped" in log and "Saved LoRA" in log
    status = trained.run.read_status()
    assert status["state"] == "running" and status["total_steps"] == STEPS  # final state is the runner's job


def test_second_run_on_the_same_data_encodes_nothing(trained):
    settings = trained.settings
    resolved = validate_config(build_config(fast_config(caption_dropout=0.2, output_name="again")), settings, CPU)
    again = LoraTrainer(resolved, settings)
    try:
        again.setup()
        s = again.cache_stats
        assert (s.latents_encoded, s.text_encoded) == (0, 0)
        assert (s.latents_hit, s.text_hit) == (16, 17)
        assert not s.vae_loaded and not s.text_encoder_loaded
        for ours, theirs in zip(again.features.latents, trained.trainer.features.latents, strict=True):
            assert torch.equal(ours, theirs)
    finally:
        again.cleanup()


def test_a_changed_caption_reencodes_only_that_caption(trained):
    settings = trained.settings
    source = settings.datasets_dir / "demo-shapes"
    copy = settings.datasets_dir / "demo-edited"
    if not copy.exists():
        shutil.copytree(source, copy)
        (copy / "images" / "003.txt").write_text("zshape, a freshly re-captioned shape")
    resolved = validate_config(
        build_config(fast_config(dataset_path="demo-edited", caption_dropout=0.2, output_name="edited")), settings, CPU
    )
    edited = LoraTrainer(resolved, settings)
    try:
        edited.setup()
        s = edited.cache_stats
        assert s.text_encoded == 1 and s.text_hit == 16  # the other 15 captions + the empty one
        assert s.latents_encoded == 0 and not s.vae_loaded  # same image bytes: same latents
    finally:
        edited.cleanup()


def _wide_model(settings):
    """The tiny pipeline with a 128-wide transformer: the 32-wide one cannot carry a 64-value patch
    (its patch embedding is a 64 -> 32 bottleneck), so no training can take its loss below ~60%."""
    from diffusers import ZImageTransformer2DModel

    from zimage.tiny import TRANSFORMER_CONFIG

    folder = settings.base_models_dir / "wide-zimage"
    shutil.copytree(settings.base_models_dir / "tiny-zimage", folder)
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(0)
    cfg = dict(TRANSFORMER_CONFIG, dim=128, n_heads=4, n_kv_heads=4, axes_dims=[16, 8, 8])
    ZImageTransformer2DModel(**cfg).save_pretrained(folder / "transformer")
    return folder


def test_overfit_one_image_drops_the_loss_below_a_floor(tmp_path, tiny_model_dir):
    """A LoRA on every linear of the 128-wide model memorises one image: from about 1.25 (the untrained
    model's loss) to under 0.7 in 80 steps. The floor is fixed; the seeded run lands near 0.57."""
    settings = make_home(tmp_path / "home", tiny_model_dir)
    _wide_model(settings)
    one = settings.datasets_dir / "one"
    (one / "images").mkdir(parents=True)
    shutil.copy(settings.datasets_dir / "demo-shapes" / "images" / "001.png", one / "images" / "001.png")
    (one / "images" / "001.txt").write_text("zshape, a red circle")
    DatasetFolder(one).write_info(DatasetInfo(name="one", trigger_word="zshape", resolution=256))
    config = fast_config(
        model_path="wide-zimage",
        dataset_path="one",
        num_steps=80,
        lora_rank=16,
        lora_alpha=16,
        learning_rate=5e-3,
        caption_dropout=0.0,
        lora_target_blocks=["layers", "noise_refiner", "context_refiner"],
        lora_target_modules=[
            "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0",
        ],
    )  # fmt: skip
    trainer = LoraTrainer(validate_config(build_config(config), settings, CPU), settings)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    losses = trainer.losses
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10  # each step's loss is noisy (random sigma)
    assert start > 1.0, f"the untrained loss was only {start:.3f}: the test would prove nothing"
    assert end < 0.7 and end < 0.6 * start, f"loss went from {start:.3f} to {end:.3f}"


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor", "prodigy"])
def test_each_optimizer_trains_in_bf16(trained, optimizer):
    """bf16 autocast with bf16 base weights and fp32 LoRA weights, warm cache; the LoRA moves and stays finite."""
    settings = trained.settings
    lr = 1.0 if optimizer == "prodigy" else 1e-3
    config = fast_config(optimizer=optimizer, mixed_precision="bf16", learning_rate=lr, num_steps=2, save_dtype="bf16")
    resolved = validate_config(build_config(config | {"output_name": f"opt-{optimizer}"}), settings, CPU)
    trainer = LoraTrainer(resolved, settings)
    try:
        trainer.setup()
        assert all(p.dtype == torch.float32 for p in trainer.params)
        base = trainer.accelerator.unwrap_model(trainer.transformer).layers[0].attention.to_q.base_layer.weight
        assert base.dtype == torch.bfloat16
        result = trainer.train()
        inner = trainer.optimizer.optimizer
        assert (
            type(inner).__name__
            == {"adamw8bit": "AdamW8bit", "adafactor": "Adafactor", "prodigy": "Prodigy"}[optimizer]
        )
    finally:
        trainer.cleanup()
    assert result.steps == 2 and all(math.isfinite(x) for x in trainer.losses)
    with safe_open(str(result.output_path), framework="pt") as fh:
        up = fh.get_tensor("diffusion_model.layers.0.attention.to_q.lora_B.weight")
    assert up.dtype == torch.bfloat16 and up.float().abs().sum() > 0


def test_turbo_model_trains_on_top_of_the_merged_training_adapter(trained):
    from zimage.training.lora_io import LoraModule, save_lora

    settings = trained.settings
    folder = settings.base_models_dir / "tiny-turbo"
    if not folder.exists():
        shutil.copytree(settings.base_models_dir / "tiny-zimage", folder)
        (folder / "zimage_model.json").unlink()  # a folder without "de-turbo" in its name is a Turbo model
    g = torch.Generator().manual_seed(3)
    delta = LoraModule(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 2.0)
    adapter = save_lora(
        settings.home / "adapter.safetensors", {"layers.1.attention.to_v": delta}, dtype=torch.float32, overwrite=True
    )
    config = fast_config(model_path="tiny-turbo", training_adapter_path=str(adapter), output_name="turbo-lora")
    resolved = validate_config(build_config(config), settings, CPU)
    assert resolved.config.use_training_adapter and resolved.adapter_path == adapter
    assert (resolved.config.sample_steps, resolved.config.sample_cfg) == (8, 1.0)
    reporter = Reporter()
    trainer = LoraTrainer(resolved, settings, reporter)
    try:
        trainer.setup()
        model = trainer.accelerator.unwrap_model(trainer.transformer)
        merged = model.layers[1].attention.to_v.base_layer.weight.detach()
        original = trained.trainer.accelerator.unwrap_model(trained.trainer.transformer)
        before = original.layers[1].attention.to_v.base_layer.weight.detach()
        assert torch.allclose(merged, before + delta.delta(), atol=1e-5)
        assert set(model.peft_config) == {"default"}  # the adapter left no adapter behind
        trainer.train()
    finally:
        trainer.cleanup()
    assert any("Merged the training adapter adapter.safetensors at +1.0" in line for line in reporter.lines)
    with safe_open(str(trainer.output_path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["base_model_type"] == "turbo" and meta["training_adapter"] == "adapter.safetensors"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_encoders_leave_gpu_memory_before_training(tmp_path, tiny_model_dir):
    settings = make_home(tmp_path / "home", tiny_model_dir)
    resolved = validate_config(build_config(fast_config(mixed_precision="bf16", num_steps=3)), settings)
    trainer = LoraTrainer(resolved, settings)
    try:
        torch.cuda.reset_peak_memory_stats()
        trainer.setup()
        assert trainer.cache_stats.vae_loaded and trainer.cache_stats.text_encoder_loaded
        model = trainer.accelerator.unwrap_model(trainer.transformer)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        held += sum(b.numel() * b.element_size() for b in model.buffers())
        features = sum(t.numel() * t.element_size() for t in trainer.features.latents if t.is_cuda)
        assert torch.cuda.memory_allocated() <= held + features + 1024 * 1024
        trainer.train()
        assert all(math.isfinite(x) for x in trainer.losses)
    finally:
        trainer.cleanup()


def test_an_output_file_that_appears_during_training_is_not_replaced(trained):
    settings = trained.settings
    resolved = validate_config(build_config(fast_config(num_steps=1, output_name="raced")), settings, CPU)
    reporter = Reporter()
    trainer = LoraTrainer(resolved, settings, reporter)
    try:
        trainer.setup()
        resolved.output_path.write_bytes(b"someone else's file")
        result = trainer.train()
    finally:
        trainer.cleanup()
    assert resolved.output_path.read_bytes() == b"someone else's file"
    assert result.output_path == resolved.output_path.with_name("raced-2.safetensors") and result.output_path.exists()
    assert any("raced.safetensors appeared while training; saving as raced-2.safetensors" in x for x in reporter.lines)


def test_the_overhead_benchmark_runs_end_to_end():
    """benchmarks/train_overhead.py (information only) on a few steps: it runs through the real trainer and
    prints its figures; the second trainer finds everything in the cache."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_overhead.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # see train_support.one_torch_thread
    proc = subprocess.run([sys.executable, str(script), "--steps", "6", "--block", "3", "--resolution", "256"],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = re.search(r"warm/cold ([\d.]+)", proc.stdout)
    ratio = re.search(
        r"256 px: trainer [\d.]+ steps/s .* ratio ([\d.]+) \(target >= 0.95; median of 2 block", proc.stdout
    )
    assert first and ratio, proc.stdout
    assert float(first.group(1)) > 0 and float(ratio.group(1)) > 0
    assert "encoded latents=0 captions=0, loaded vae=False text_encoder=False" in proc.stdout
