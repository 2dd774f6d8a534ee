"""Memory options in the config: bitsandbytes quantization (8-bit / NF4) is CUDA-only and says so."""

from __future__ import annotations

import pytest
from shared_cache import home_with_shared_cache
from train_support import fast_config

from zimage.config import ConfigError, MachineInfo, build_config, validate_config
from zimage.training import zimage_math

CPU = MachineInfo(cuda=False, bf16=True)
GPU = MachineInfo(cuda=True, bf16=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return home_with_shared_cache(tmp_path_factory, tiny_model_dir, "options")


def _problems(home, machine, **overrides) -> dict[str, str]:
    try:
        validate_config(build_config(fast_config(**overrides)), home, machine)
    except ConfigError as exc:
        return {p.field: str(p) for p in exc.problems}
    return {}


@pytest.mark.parametrize(("given", "stored"), [(True, True), ("8bit", True), ("NF4", "nf4"), ("4bit", "nf4"),
                                               ("none", False), (False, False)])  # fmt: skip
def test_quantize_accepts_true_8bit_and_nf4(given, stored):
    config = build_config(fast_config(quantize=given, quantize_te=given))
    assert config.quantize == stored and config.quantize_te == stored


def test_a_bad_quantize_value_lists_what_is_allowed():
    with pytest.raises(ConfigError, match=r'quantize = \'int3\': must be false, true or "8bit" \(8-bit\), or "nf4"'):
        build_config(fast_config(quantize="int3"))


@pytest.mark.parametrize("field", ["quantize", "quantize_te"])
@pytest.mark.parametrize("value", [True, "nf4"])
def test_quantized_loading_on_a_cpu_is_a_validation_error_with_the_reason(home, field, value):
    problems = _problems(home, CPU, **{field: value})
    assert list(problems) == [field]
    assert "bitsandbytes quantized loading needs a CUDA GPU" in problems[field] and "No GPU found" in problems[field]


def test_on_a_gpu_quantize_passes_except_for_a_full_finetune(home):
    problems = _problems(home, GPU, quantize="nf4", quantize_te=True)  # (the optimizer probe needs a real GPU)
    assert "quantize" not in problems and "quantize_te" not in problems
    problems = _problems(home, GPU, quantize=True, training_type="finetune")
    assert "cannot be quantized" in problems["quantize"]


def test_the_bitsandbytes_configs_match_the_mode():
    assert zimage_math.bnb_config(False, "diffusers") is None
    eight = zimage_math.bnb_config(True, "diffusers")
    assert eight.load_in_8bit and not eight.load_in_4bit
    nf4 = zimage_math.bnb_config("nf4", "transformers")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert type(nf4).__module__.startswith("transformers") and type(eight).__module__.startswith("diffusers")


def test_sample_resolution_must_fit_the_vae_and_patch_grid(home):
    assert "multiple of 16" in _problems(home, CPU, sample_resolution=100)["sample_resolution"]
    assert _problems(home, CPU, sample_resolution=128) == {}
