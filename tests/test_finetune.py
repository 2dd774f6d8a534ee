"""Full fine-tune on the tiny De-Turbo-typed model: refused on Turbo, saves a transformer that loads back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from shared_cache import home_with_shared_cache
from train_support import fast_config, one_thread_per_module  # noqa: F401 - autouse

from zimage.cli import main
from zimage.config import ConfigError, build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training import checkpoints
from zimage.training.runner import run_training

FT = dict(training_type="finetune", num_steps=4, learning_rate=1e-2, save_every_n_steps=2, caption_dropout=0.0)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return home_with_shared_cache(tmp_path_factory, tiny_model_dir, "finetune")


def _losses(run: RunFolder) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, run.metrics_path.read_text().splitlines())}


@pytest.fixture(scope="module")
def finetuned(home, tmp_path_factory):
    resolved = validate_config(build_config(fast_config(**FT, output_name="ft")), home)
    run = RunFolder(tmp_path_factory.mktemp("ft") / "run")
    run.write_config(resolved.config.to_dict())
    assert run_training(resolved, home, run.path) == 0, run.read_status().get("traceback")
    return resolved, run


def test_turbo_is_refused_with_the_reason(home):
    folder = home.base_models_dir / "tiny-turbo"
    if not folder.exists():
        shutil.copytree(home.base_models_dir / "tiny-zimage", folder)
        (folder / "zimage_model.json").unlink()  # a folder without "de-turbo" in its name is a Turbo model
    config = build_config(fast_config(**FT, model_path="tiny-turbo", use_training_adapter=False))
    with pytest.raises(ConfigError) as info:
        validate_config(config, home)
    [problem] = info.value.problems
    assert problem.field == "training_type" and "needs a De-Turbo model" in str(problem)
    assert "step-distilled" in str(problem)


def test_full_finetune_preset_validates_on_de_turbo_and_writes_to_models_finetuned(home):
    config = build_config({"model_path": "tiny-zimage", "dataset_path": "demo-shapes", "optimizer": "adamw"},
                          preset="full_finetune")  # fmt: skip
    resolved = validate_config(config, home)
    assert resolved.config.training_type == "finetune"
    assert resolved.output_path == home.finetuned_dir / "full_finetune"


def test_the_saved_transformer_loads_into_a_pipeline_and_changes_the_output(finetuned):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    resolved, run = finetuned
    folder = resolved.output_path
    assert run.read_status()["state"] == "completed" and run.read_status()["output_path"] == str(folder)
    meta = json.loads((folder / "zimage_finetune.json").read_text())
    assert meta["steps"] == "4" and json.loads(meta["training_config"])["training_type"] == "finetune"
    assert list((folder / "transformer").glob("*.safetensors")) and not list(folder.parent.glob(".tmp-*"))

    tuned = ZImageTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
    base = ZImageTransformer2DModel.from_pretrained(resolved.model_dir / "transformer", torch_dtype=torch.float32)
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) > len(tuned.state_dict()) // 2  # all weights trained, not a LoRA's few

    def draw(transformer):
        pipe = ZImagePipeline.from_pretrained(resolved.model_dir, transformer=transformer, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=0.0,
                   generator=torch.Generator().manual_seed(1), output_type="pt").images  # fmt: skip
        return out

    assert (draw(tuned) - draw(base)).abs().max() > 1e-3


def test_finetune_checkpoints_hold_a_transformer_and_resume_exactly(home, finetuned, tmp_path, monkeypatch):
    _, straight = finetuned
    ckpt = checkpoints.newest_checkpoint(straight.checkpoints_dir)
    assert ckpt.step == 4 and (ckpt.transformer_dir / "config.json").is_file() and not ckpt.lora_path.exists()

    resolved = validate_config(build_config(fast_config(**FT, output_name="ft-stopped")), home)
    run = RunFolder(tmp_path / "run")
    run.write_config(resolved.config.to_dict())

    def on_step(record):
        if record["step"] == 1:
            run.send_control("stop")

    assert run_training(resolved, home, run.path, on_step=on_step) == 0
    assert run.read_status()["state"] == "stopped"
    monkeypatch.setenv("ZIMAGE_HOME", str(home.home))
    assert main(["train", "--resume", str(run.path)]) == 0
    assert run.read_status()["state"] == "completed" and run.read_status()["step"] == 4
    want, got = _losses(straight), _losses(run)
    for step in range(1, 5):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step
