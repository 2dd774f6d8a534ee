"""The Z-Image base model (model_type "base") on the tiny stand-in: its own scheduler shift, CFG samples
with the negative prompt, a LoRA that diffusers loads and that has the ComfyUI key layout."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from train_support import fast_config, make_home, one_thread_per_module  # noqa: F401 - autouse

from zimage import catalogue
from zimage.config import ConfigError, MachineInfo, build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.tiny import TINY_VARIANTS, write_tiny_model
from zimage.training import zimage_math
from zimage.training.reporting import Reporter
from zimage.training.trainer import LoraTrainer

CPU = MachineInfo(cuda=False, bf16=True)
BASE = "tiny-zimage-base"
BASE_SHIFT = TINY_VARIANTS["base"]["shift"]


def comfyui_key_problems(path) -> list[str]:
    """What keeps a LoRA file from the layout diffusers and ComfyUI both load (DESIGN.md section 4): every
    key `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` / `.alpha`, all three per module, no
    fused qkv (the same rules tests/test_train.py checks on the De-Turbo run)."""
    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    problems = [k for k in keys if not k.startswith("diffusion_model.") or "qkv" in k]
    suffixes = (".lora_A.weight", ".lora_B.weight", ".alpha")
    problems += [k for k in keys if not k.endswith(suffixes)]
    modules = {k[: -len(next(s for s in suffixes if k.endswith(s)))] for k in keys if k.endswith(suffixes)}
    problems += [f"{m}: not all of A, B, alpha" for m in modules if not all(m + s in keys for s in suffixes)]
    return problems if keys else ["no keys"]


@pytest.fixture(scope="module")
def base_home(tmp_path_factory, tiny_model_dir):
    settings = make_home(tmp_path_factory.mktemp("base") / "home", tiny_model_dir)
    write_tiny_model(settings.base_models_dir / BASE, model_type="base")
    return settings


@pytest.fixture(scope="module")
def base_run(base_home, tmp_path_factory):
    config = fast_config(model_path=BASE, num_steps=3, timestep_sampling="shift", sample_every_n_steps=3,
                         sample_steps=2, sample_resolution=64, learning_rate=5e-3)  # fmt: skip
    resolved = validate_config(build_config(config), base_home, CPU)
    run = RunFolder(tmp_path_factory.mktemp("base-run") / "run")
    trainer = LoraTrainer(resolved, base_home, Reporter(run))
    trainer.setup()
    result = trainer.train()
    yield SimpleNamespace(resolved=resolved, run=run, trainer=trainer, result=result)
    trainer.cleanup()


def test_the_base_folder_is_a_base_model_with_its_own_shift(base_home):
    folder = base_home.base_models_dir / BASE
    entry, path = catalogue.resolve(BASE, base_home)
    assert entry.model_type == "base" and path == folder
    assert (
        catalogue.scheduler_shift(folder)
        == BASE_SHIFT
        != catalogue.scheduler_shift(base_home.base_models_dir / "tiny-zimage")
    )
    c = validate_config(build_config(fast_config(model_path=BASE)), base_home, CPU).config
    assert (c.model_type, c.use_training_adapter, c.timestep_shift) == ("base", False, BASE_SHIFT)
    assert c.sample_negative_prompt == catalogue.BASE_NEGATIVE_PROMPT  # CFG with a negative prompt by default
    explicit = validate_config(build_config(fast_config(model_path=BASE, timestep_shift=2.0)), base_home, CPU).config
    assert explicit.timestep_shift == 2.0  # an explicit value wins


def test_full_finetune_allowed_on_base_and_the_adapter_refused(base_home):
    ft = validate_config(build_config(fast_config(model_path=BASE, training_type="finetune")), base_home, CPU)
    assert ft.config.training_type == "finetune"
    with pytest.raises(ConfigError) as err:
        validate_config(build_config(fast_config(model_path=BASE, use_training_adapter=True)), base_home, CPU)
    assert "use_training_adapter" in str(err.value) and "base trains without it" in str(err.value)
    with pytest.raises(ConfigError, match="undistilled: model_type de_turbo or base"):
        validate_config(build_config(fast_config(model_type="turbo", training_type="finetune",
                                                 use_training_adapter=False)), base_home, CPU)  # fmt: skip


def test_the_trainer_draws_sigmas_with_the_models_shift(base_run):
    trainer = base_run.trainer
    assert trainer.config.timestep_shift == BASE_SHIFT
    trainer.noise_gen.manual_seed(1234)
    drawn = trainer._sigmas(64)
    for shift, same in ((BASE_SHIFT, True), (3.0, False)):
        expected = zimage_math.sample_sigmas(64, "shift", shift=shift, generator=torch.Generator().manual_seed(1234))
        assert torch.allclose(drawn, expected) is same
    # the sampler's scheduler is the model folder's too
    pipe = trainer.image_sampler._pipeline(trainer.accelerator.unwrap_model(trainer.transformer))
    assert pipe.scheduler.config.shift == BASE_SHIFT


def test_base_samples_use_cfg_and_the_negative_prompt_reaches_the_pipeline(base_run):
    lines = [json.loads(x) for x in (base_run.run.path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 3]
    assert all(r["cfg"] == TINY_VARIANTS["base"]["sample_cfg"] > 1 for r in lines)
    assert all(r["negative_prompt"] == catalogue.BASE_NEGATIVE_PROMPT for r in lines)
    sampler = base_run.trainer.image_sampler
    model = base_run.trainer.accelerator.unwrap_model(base_run.trainer.transformer)

    def image(negative: str, cfg: float):
        import numpy as np

        sampler.settings = sampler.settings.__class__(**{**sampler.settings.__dict__, "negative_prompt": negative,
                                                         "cfg": cfg})  # fmt: skip
        sampler._embeddings = None
        return np.asarray(sampler.generate(model)[0][2], dtype=np.int16)

    with_cfg = image("blurry", 4.0), image("a red circle, sharp", 4.0)
    without = image("blurry", 1.0), image("a red circle, sharp", 1.0)
    assert abs(with_cfg[0] - with_cfg[1]).max() > 0  # another negative prompt, another image: it was used
    assert abs(without[0] - without[1]).max() == 0  # CFG off: the negative prompt plays no part


def test_the_base_lora_loads_in_diffusers_and_has_the_comfyui_keys(base_run):
    from diffusers import ZImagePipeline

    path = base_run.result.output_path
    assert comfyui_key_problems(path) == []
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["base_model_type"] == "base" and fh.metadata()["base_model"] == BASE
    pipe = ZImagePipeline.from_pretrained(base_run.resolved.model_dir)

    def latents():
        return pipe("a photo of zshape", height=64, width=64, num_inference_steps=2, guidance_scale=3.0,
                    negative_prompt="blurry", output_type="latent", generator=torch.Generator().manual_seed(3)).images  # fmt: skip

    before = latents()
    pipe.load_lora_weights(str(path))
    after = latents()
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4


def test_the_key_check_refuses_a_fused_qkv_file(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.zeros(2, 4),
               "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.zeros(12, 2)}, str(bad))  # fmt: skip
    assert len(comfyui_key_problems(bad)) >= 2


def test_copying_the_base_folder_keeps_its_type(base_home, tmp_path):
    copy = tmp_path / "my-base"
    shutil.copytree(base_home.base_models_dir / BASE, copy)
    entry, _ = catalogue.resolve(str(copy), base_home)
    assert entry.model_type == "base" and catalogue.scheduler_shift(copy) == BASE_SHIFT
