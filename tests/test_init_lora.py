"""init_lora: a run continues from a LoRA file's weights, its rank, alpha and targets taken from the file."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from train_support import fast_config, make_home, one_thread_per_module  # noqa: F401 - autouse

from zimage.config import ConfigError, MachineInfo, build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training import lora_io
from zimage.training.init_lora import InitLoraError
from zimage.training.reporting import Reporter
from zimage.training.trainer import ADAPTER_NAME, LoraTrainer

CPU = MachineInfo(cuda=False, bf16=True)


def _config(**overrides) -> dict:
    return fast_config(seed=5, num_steps=6, learning_rate=1e-2, lora_rank=4, lora_alpha=8, **overrides)


def _trainer(settings, root, config: dict) -> LoraTrainer:
    resolved = validate_config(build_config(config), settings, CPU)
    return LoraTrainer(resolved, settings, Reporter(RunFolder(root / config["output_name"])))


def _without_shape(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("lora_rank", "lora_alpha")}


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("init")
    settings = make_home(root / "home", tiny_model_dir)
    trainer = _trainer(settings, root, _config(output_name="first"))
    trainer.setup()
    result = trainer.train()
    trainer.cleanup()
    return SimpleNamespace(settings=settings, root=root, result=result, losses=list(trainer.losses))


def test_continuing_from_a_finished_run_starts_lower_and_takes_the_files_shape(first):
    config = _without_shape(_config(output_name="second", init_lora=str(first.result.output_path)))
    trainer = _trainer(first.settings, first.root, config)
    trainer.setup()
    assert (trainer.config.lora_rank, trainer.config.lora_alpha) == (4, 8.0)  # from the file, not the defaults 32
    model = trainer.accelerator.unwrap_model(trainer.transformer)
    loaded = lora_io.peft_modules(model, ADAPTER_NAME, 8.0)
    saved = lora_io.read_lora(first.result.output_path).modules
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k].up, saved[k].up) for k in saved)
    trainer.train()
    trainer.cleanup()
    # the same seed draws the same batches, noise and sigmas: step for step, the continued run is lower
    assert trainer.losses[0] < first.losses[0]
    assert sum(trainer.losses) / 6 < sum(first.losses) / 6
    assert (
        f"Continuing from {first.result.output_path.name}: rank 4, alpha 8"
        in (trainer.report.run.path / "log.txt").read_text()
    )


def test_a_mismatched_rank_names_both_ranks(first):
    config = _config(output_name="third", init_lora=str(first.result.output_path))
    config.update(lora_rank=8, lora_alpha=8)
    trainer = _trainer(first.settings, first.root, config)
    with pytest.raises(InitLoraError) as err:
        trainer.setup()
    assert "lora_rank = 8" in str(err.value) and "lora_rank = 4" in str(err.value)
    assert trainer.transformer is None  # refused before the model was loaded


def test_a_mismatched_target_names_both(first):
    config = _without_shape(_config(output_name="fourth", init_lora=str(first.result.output_path),
                                    lora_target_modules=["attention.to_q"]))  # fmt: skip
    with pytest.raises(InitLoraError, match=r"lora_target_modules = \['attention.to_q'\] in the config"):
        _trainer(first.settings, first.root, config).setup()


def test_a_comfyui_style_file_continues_too(first, tmp_path):
    saved = lora_io.read_lora(first.result.output_path).modules
    tensors = {}
    for path, m in saved.items():  # ComfyUI / ai-toolkit names: lora_down / lora_up under diffusion_model.
        tensors[f"diffusion_model.{path}.lora_down.weight"] = m.down.contiguous()
        tensors[f"diffusion_model.{path}.lora_up.weight"] = m.up.contiguous()
        tensors[f"diffusion_model.{path}.alpha"] = torch.tensor(m.alpha)
    comfy = tmp_path / "comfy.safetensors"
    save_file(tensors, str(comfy))
    trainer = _trainer(first.settings, first.root, _without_shape(_config(output_name="fifth", init_lora=str(comfy))))
    trainer.setup()
    loaded = lora_io.peft_modules(trainer.accelerator.unwrap_model(trainer.transformer), ADAPTER_NAME, 8.0)
    assert all(torch.equal(loaded[k].down, saved[k].down) for k in saved)
    trainer.cleanup()


def test_init_lora_must_be_a_safetensors_file(first):
    with pytest.raises(ConfigError) as err:
        validate_config(build_config(_config(init_lora="missing.safetensors")), first.settings, CPU)
    assert [p.field for p in err.value.problems] == ["init_lora"]
