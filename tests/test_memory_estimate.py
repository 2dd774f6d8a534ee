"""The memory estimate: real parameter counts, a breakdown that adds up, and the directions every knob moves it.

Counts are checked against the diffusers / transformers classes built on the meta device (no memory,
no download); the activation formula against the tensors autograd really keeps in diffusers' block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from zimage.training.memory import (
    ENCODE_BATCH,
    TEXT_TOKENS,
    TINY,
    ZIMAGE,
    _block_token_bytes,
    architecture_for,
    estimate_memory,
    memory_savings,
)
from zimage.training.model_shapes import DEFAULT_TARGET_MODULES, architecture_from_folder, lora_targets

ROOT = Path(__file__).resolve().parents[1]


def cfg(**changes):
    base = dict(
        training_type="lora", model_path="z-image-turbo", lora_rank=32, batch_size=1, resolution=1024,
        gradient_checkpointing=True, optimizer="adamw8bit", quantize=False, quantize_te=False,
        mixed_precision="bf16", train_text_encoder=False,
    )  # fmt: skip
    return SimpleNamespace(**{**base, **changes})


def training(**changes):
    return estimate_memory(cfg(**changes)).phases["training"]


# -- parameter counts ------------------------------------------------------------------------------
def test_closed_form_counts_match_the_meta_instantiated_real_models():
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**ZIMAGE.transformer)
        text_encoder = Qwen3Model(Qwen3Config(**ZIMAGE.text_encoder))
        vae = AutoencoderKL(
            **{k: v for k, v in ZIMAGE.vae.items()},
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert ZIMAGE.transformer_params() == count(transformer) == 6_154_908_736  # "6.15 B"
    assert ZIMAGE.text_encoder_params() == count(text_encoder) == 4_022_468_096  # Qwen3-4B
    assert ZIMAGE.vae_params() == count(vae)
    # Every Linear of the transformer, by name and shape.
    real = {
        n: (m.in_features, m.out_features) for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert {lin.name: (lin.fan_in, lin.fan_out) for lin in ZIMAGE.transformer_linears()} == real
    te_real = {n for n, m in text_encoder.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {lin.name for lin in ZIMAGE.text_encoder_linears()} == te_real


def test_closed_form_counts_match_the_tiny_pipeline():
    from zimage.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert TINY.transformer_params() == count(pipe.transformer)
    assert TINY.text_encoder_params() == count(pipe.text_encoder)
    assert TINY.vae_params() == count(pipe.vae)


def test_lora_count_matches_the_trainers_peft_adapter():
    import torch
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig

    from zimage.training.trainer import target_regex

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**ZIMAGE.transformer)
        model.add_adapter(
            LoraConfig(r=4, lora_alpha=4, target_modules=target_regex(["layers"], list(DEFAULT_TARGET_MODULES)))
        )
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    est = estimate_memory(cfg(lora_rank=4))
    assert est.params["lora"] == lora == 4 * 30 * (4 * 2 * 3840 + 3 * (3840 + 10240))
    assert len(lora_targets(ZIMAGE, DEFAULT_TARGET_MODULES)) == 30 * 7  # refiners excluded


def test_constants_follow_the_trainer():
    from zimage.training import features, zimage_math

    assert ENCODE_BATCH == features.ENCODE_BATCH
    assert TEXT_TOKENS == zimage_math.MAX_TEXT_TOKENS


# -- the activation formula against autograd -------------------------------------------------------
def test_block_activation_formula_matches_the_tensors_autograd_keeps():
    """A real-shaped block (head_dim 128, dim 512), LoRA on attention + feed-forward, bf16 autocast."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    torch.manual_seed(0)
    dim, heads = 512, 4
    model = ZImageTransformer2DModel(
        dim=dim, n_layers=2, n_refiner_layers=1, n_heads=heads, n_kv_heads=heads, cap_feat_dim=64,
        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
    ).to(torch.bfloat16)  # fmt: skip
    model.requires_grad_(False)
    targets = [f"layers.{i}.{m}" for i in range(2) for m in DEFAULT_TARGET_MODULES]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    cast_training_params(model, dtype=torch.float32)

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    kept = {"layers.1": 0, "noise_refiner.0": 0}
    where = ["outside"]
    for name in kept:
        block = model.get_submodule(name)
        block.register_forward_pre_hook(lambda _m, _a, n=name: where.__setitem__(0, n))
        block.register_forward_hook(lambda _m, _a, _o: where.__setitem__(0, "outside"))

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen and where[0] in kept:
            seen.add(ptr)
            kept[where[0]] += t.untyped_storage().nbytes()
        return t

    side, cap = 32, 64  # 16 x 16 = 256 image tokens + 64 caption tokens, no padding
    x = [torch.randn(16, 1, side, side, dtype=torch.bfloat16)]
    feats = [torch.randn(cap, 64, dtype=torch.bfloat16)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, torch.tensor([0.5]), feats, return_dict=False)
    tokens = (side // 2) ** 2 + cap
    ffn = int(dim / 3 * 8)
    lora_inputs = (6 * dim + ffn) * 2  # one bf16 copy of its input per LoRA'd linear
    expected = _block_token_bytes(dim, ffn, 2, lora_inputs) * tokens
    assert abs(kept["layers.1"] - expected) / expected < 0.06, (kept["layers.1"], expected)
    assert kept["noise_refiner.0"] == 0  # before every LoRA: no gradient passes, nothing is kept


# -- the breakdown ---------------------------------------------------------------------------------
def test_breakdown_sums_to_the_totals():
    for c in (cfg(), cfg(training_type="finetune"), cfg(train_text_encoder=True, quantize="nf4"), cfg(resolution=512)):
        est = estimate_memory(c)
        for phase, items in est.phases.items():
            assert est.phase_totals[phase] == pytest.approx(sum(items.values()))
            assert all(v >= 0 for v in items.values())
        assert est.total_gib == pytest.approx(max(est.phase_totals.values()))
        assert est.total_gib == est.phase_totals[est.peak_phase]
        data = json.loads(json.dumps(est.to_dict()))
        assert data["total_gib"] == pytest.approx(est.total_gib, abs=1e-3)
        assert set(data["phases"]["training"]) == {
            "transformer_weights", "text_encoder_weights", "trainable_params", "gradients", "optimizer_state",
            "activations", "workspace",
        }  # fmt: skip
        assert "GiB" in est.summary()


def test_real_model_figures_are_the_known_ones():
    est = estimate_memory(cfg())
    t = est.phases["training"]
    assert t["transformer_weights"] == pytest.approx(6_154_908_736 * 2 / 2**30)  # 11.46 GiB in bf16
    assert est.params["lora"] == 70_041_600  # rank 32 on attention + feed-forward of the 30 main layers
    assert t["trainable_params"] == pytest.approx(70_041_600 * 4 / 2**30)  # fp32 LoRA weights
    assert est.tokens == {"image": 4096, "caption": 128, "main": 4224, "batch": 1}
    assert est.phases["text_caching"]["text_encoder_weights"] == pytest.approx(4_022_468_096 * 2 / 2**30)
    assert 12 < est.training_gib < 18  # the public trainers' users report ~16 GB cards for 1024 LoRAs


def test_monotonic_in_rank_batch_and_resolution():
    for key, values in (
        ("lora_rank", [4, 16, 64, 128]),
        ("batch_size", [1, 2, 4]),
        ("resolution", [256, 512, 768, 1024]),
    ):
        totals = [estimate_memory(cfg(**{key: v})).training_gib for v in values]
        assert totals == sorted(totals) and len(set(totals)) == len(totals), (key, totals)


def test_checkpointing_lowers_activations():
    on, off = training(gradient_checkpointing=True), training(gradient_checkpointing=False)
    assert on["activations"] < off["activations"] / 5
    assert 25 < off["activations"] < 45  # ~305 KB per token per main layer x 4224 tokens x 30 layers


def test_quantization_lowers_weights():
    plain, int8, nf4 = (training(quantize=q)["transformer_weights"] for q in (False, "8bit", "nf4"))
    assert nf4 < int8 < plain
    assert int8 / plain == pytest.approx(0.5, abs=0.02) and nf4 / plain == pytest.approx(0.28, abs=0.02)
    assert training(quantize=True)["transformer_weights"] == int8  # bool True means 8-bit
    te = {q: estimate_memory(cfg(quantize_te=q)).phases["text_caching"]["text_encoder_weights"] for q in (False, "nf4")}
    assert te["nf4"] < te[False] / 2


def test_optimizer_state_follows_the_optimizer():
    state = {o: training(optimizer=o)["optimizer_state"] for o in ("adamw", "adamw8bit", "adafactor", "prodigy")}
    assert state["adamw8bit"] < state["adamw"] / 3.5  # 2 bytes (+ absmax) instead of 8 per value
    assert state["adafactor"] < state["adamw8bit"]  # factored second moment
    assert state["prodigy"] > state["adamw"]
    est = estimate_memory(cfg(optimizer="lion"))
    assert any("'lion'" in n for n in est.notes)


def test_finetune_is_much_larger_than_lora():
    lora, ft = estimate_memory(cfg()), estimate_memory(cfg(training_type="finetune"))
    assert ft.params["trainable"] == ZIMAGE.transformer_params()
    assert ft.phases["training"]["gradients"] == pytest.approx(ft.phases["training"]["transformer_weights"])
    assert ft.training_gib > 2.2 * lora.training_gib
    assert estimate_memory(cfg(training_type="finetune", optimizer="adamw")).training_gib > 50
    assert any("quantize ignored" in n for n in estimate_memory(cfg(training_type="finetune", quantize=True)).notes)


def test_text_encoder_training_keeps_it_on_the_device():
    est = estimate_memory(cfg(train_text_encoder=True))
    assert "text_caching" not in est.phases
    t = est.phases["training"]
    assert t["text_encoder_weights"] == pytest.approx(4_022_468_096 * 2 / 2**30)
    assert t["activations"] > training()["activations"]
    assert any("cannot be cached" in n for n in est.notes)


def test_caching_phases_scale_with_their_inputs():
    small, large = estimate_memory(cfg(resolution=512)), estimate_memory(cfg(resolution=1024))
    assert large.phases["latent_caching"]["vae_workspace"] == pytest.approx(
        4 * small.phases["latent_caching"]["vae_workspace"]
    )
    assert large.phases["text_caching"] == small.phases["text_caching"]  # prompts are always 512 tokens
    assert "sampling" not in estimate_memory(cfg(sample_every_n_steps=0)).phases


# -- configs and architectures --------------------------------------------------------------------
def test_the_trainers_config_object_works_unchanged(tiny_model_dir):
    from zimage.config import TrainingConfig

    est = estimate_memory(TrainingConfig())
    assert est.architecture == "z-image" and not est.notes
    assert est.params["lora"] == 70_041_600  # the config's default rank 32 and targets
    tiny = estimate_memory(TrainingConfig(model_path="tiny-zimage", resolution=256))
    assert tiny.architecture == "tiny-zimage" and tiny.total_gib < 0.5
    folder = architecture_for(SimpleNamespace(model_path=str(tiny_model_dir)))
    assert folder.transformer_params() == TINY.transformer_params()
    assert folder.text_encoder_params() == TINY.text_encoder_params()
    assert architecture_from_folder(tiny_model_dir).vae_params() == TINY.vae_params()


def test_savings_are_real_and_ranked():
    heavy = cfg(gradient_checkpointing=False, optimizer="adamw", batch_size=2)
    before = estimate_memory(heavy).total_gib
    advice = memory_savings(heavy)
    assert advice[0][0] == "turn on gradient_checkpointing"
    assert [s for _, s in advice] == sorted((s for _, s in advice), reverse=True)
    assert all(s > 0 for _, s in advice)
    after = estimate_memory(cfg(gradient_checkpointing=True, optimizer="adamw", batch_size=2)).total_gib
    assert before - after == pytest.approx(advice[0][1])
    assert memory_savings(cfg(quantize="nf4", lora_rank=8, resolution=512, optimizer="adamw8bit")) == []


# -- the GPU benchmark ------------------------------------------------------------------------------
def _bench(*args: str) -> subprocess.CompletedProcess:
    # the same answer on a machine with a GPU; one torch thread: see train_support.one_torch_thread
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_train.py"), *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip


# The --tiny run of the benchmark (the trainer's code path, every column): tests/test_gpu_train_bench.py


def test_gpu_benchmark_without_cuda_says_so_and_exits_0():
    proc = _bench()
    assert proc.returncode == 0
    assert "needs CUDA" in proc.stdout
    assert "s/step" not in proc.stdout
