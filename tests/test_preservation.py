"""Differential output preservation: with it on, the LoRA changes the model's output on the class prompt
less than without it (same seed, same steps), while it still trains on the trigger word."""

from __future__ import annotations

import json

import pytest
import torch
from train_support import fast_config, make_home, one_thread_per_module  # noqa: F401 - autouse

from zimage.config import ConfigError, MachineInfo, build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training import zimage_math
from zimage.training.preservation import class_caption
from zimage.training.reporting import Reporter
from zimage.training.trainer import LoraTrainer

CPU = MachineInfo(cuda=False, bf16=True)
CLASS = "a shape"


def test_class_caption_replaces_the_whole_trigger_word():
    assert class_caption("zshape, a red circle", "zshape", CLASS) == "a shape, a red circle"
    assert class_caption("a zshapes  thing by zshape", "zshape", CLASS) == "a zshapes thing by a shape"


def _effect_on_class_prompt(trainer: LoraTrainer) -> float:
    """mean |LoRA output - base output| on the class captions, at fixed latents, noise and sigmas."""
    model = trainer.accelerator.unwrap_model(trainer.transformer)
    model.eval()
    captions = [class_caption(it.caption, "zshape", CLASS) for it in trainer.training_set.items[:6]]
    text = trainer._texts(list(dict.fromkeys(captions)))
    gen = torch.Generator().manual_seed(0)
    total = 0.0
    with torch.no_grad():
        for i, caption in enumerate(captions):
            x0 = trainer.features.latents[i][None]
            sigmas = torch.tensor([0.3, 0.6, 0.9])
            x_t = zimage_math.noisy_latents(
                x0.expand(3, *x0.shape[1:]), torch.randn((3, *x0.shape[1:]), generator=gen), sigmas
            )
            with_lora = zimage_math.predict(model, x_t, sigmas, [text[caption]] * 3)
            model.disable_adapters()
            base = zimage_math.predict(model, x_t, sigmas, [text[caption]] * 3)
            model.enable_adapters()
            total += float((with_lora - base).abs().mean())
    return total / len(captions)


@pytest.fixture(scope="module")
def effects(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pres")
    settings = make_home(root / "home", tiny_model_dir)
    out = {}
    for name, extra in (("off", {}), ("on", {"preservation": {"weight": 4.0, "prompt": CLASS}})):
        config = fast_config(seed=3, num_steps=8, learning_rate=2e-2, caption_dropout=0.0, output_name=name, **extra)
        resolved = validate_config(build_config(config), settings, CPU)
        run = RunFolder(root / name)
        trainer = LoraTrainer(resolved, settings, Reporter(run))
        trainer.setup()
        trainer.train()
        lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
        out[name] = (_effect_on_class_prompt(trainer), lines, trainer)
        trainer.cleanup()
    return out


def test_preservation_keeps_the_class_prompt_closer_to_the_base_model(effects):
    off, on = effects["off"][0], effects["on"][0]
    print(f"mean |delta| on the class prompt: off {off:.5f}, on {on:.5f}")
    assert on < 0.7 * off, (on, off)
    assert on > 0  # the LoRA still trained


def test_preservation_is_in_the_loss_and_costs_step_time(effects):
    off_lines, on_lines = effects["off"][1], effects["on"][1]
    assert all("step_time" in r for r in on_lines) and len(on_lines) == len(off_lines) == 8
    # step 1 has the same batch, noise and zero-initialised LoRA: the preservation term is 0 there
    assert on_lines[0]["loss"] == pytest.approx(off_lines[0]["loss"], rel=1e-6)
    assert on_lines[-1]["loss"] != off_lines[-1]["loss"]
    assert "Preservation: weight 4, 'zshape' -> 'a shape'" in (effects["on"][2].report.run.path / "log.txt").read_text()


def test_preservation_needs_a_prompt(effects):
    settings = effects["on"][2].settings
    with pytest.raises(ConfigError) as err:
        validate_config(build_config(fast_config(preservation_weight=1.0)), settings, CPU)
    assert [p.field for p in err.value.problems] == ["preservation_prompt"]
