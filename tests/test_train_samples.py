"""Samples during training: when, where, which prompts and seeds, and that they match the LoRA elsewhere."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from shared_cache import home_with_shared_cache
from train_support import fast_config, one_thread_per_module  # noqa: F401 - autouse

from zimage.config import build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training.runner import run_training

PROMPTS = ["a photo of [trigger]", "[trigger] on a white background"]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return home_with_shared_cache(tmp_path_factory, tiny_model_dir, "samples")


def _train(home, folder, **overrides):
    resolved = validate_config(build_config(fast_config(**overrides)), home)
    run = RunFolder(folder)
    run.write_config(resolved.config.to_dict())
    assert run_training(resolved, home, run.path) == 0, run.read_status().get("traceback")
    return resolved, run


def _records(run: RunFolder) -> list[dict]:
    return [json.loads(line) for line in run.samples_path.read_text().splitlines()]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _reference(model_dir, lora_path, record) -> np.ndarray:
    """The same prompt and seed drawn by a plain ZImagePipeline with the saved LoRA loaded."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    if lora_path is not None:
        pipe.load_lora_weights(str(lora_path))
    image = pipe(
        prompt=record["prompt"], height=record["height"], width=record["width"],
        num_inference_steps=record["steps"], guidance_scale=record["cfg"] - 1.0,
        generator=torch.Generator("cpu").manual_seed(record["seed"]),
    ).images[0]  # fmt: skip
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_samples_at_start_every_n_and_end_match_the_saved_lora(home, tmp_path):
    resolved, run = _train(
        home, tmp_path / "run", num_steps=4, sample_every_n_steps=2, sample_prompts=PROMPTS,
        trigger_word="zshape", learning_rate=5e-2, output_name="sampled", sample_resolution=64,
    )  # fmt: skip
    records = _records(run)
    assert [(r["step"], r["index"]) for r in records] == [(s, i) for s in (0, 2, 4) for i in (0, 1)]
    assert [r["reason"] for r in records[::2]] == ["baseline", "every_n_steps", "end"]
    assert {r["prompt"] for r in records} == {"a photo of zshape", "zshape on a white background"}
    assert [r["seed"] for r in records[:2]] == [42, 43]
    # The tiny model's type (De-Turbo) decides steps and CFG: 4 steps, CFG 2 (guidance_scale 1).
    assert all(r["steps"] == 4 and r["cfg"] == 2.0 and (r["width"], r["height"]) == (64, 64) for r in records)
    for r in records:
        assert (run.path / r["path"]).is_file() and Image.open(run.path / r["path"]).size == (64, 64)
    assert not list(run.samples_dir.glob(".*"))  # no temp files left
    assert not np.array_equal(_pixels(run.path / records[0]["path"]), _pixels(run.path / records[4]["path"]))

    end = records[4]
    want = _reference(resolved.model_dir, resolved.output_path, end)
    assert np.abs(_pixels(run.path / end["path"]) - want).max() <= 2
    base = _reference(resolved.model_dir, None, records[0])
    assert np.abs(_pixels(run.path / records[0]["path"]) - base).max() <= 2  # step 0: the LoRA is zero


def test_turbo_samples_show_turbo_plus_the_lora_not_the_adapter(home, tmp_path):
    from zimage.training.lora_io import LoraModule, save_lora

    folder = home.base_models_dir / "tiny-turbo"
    if not folder.exists():
        shutil.copytree(home.base_models_dir / "tiny-zimage", folder)
        (folder / "zimage_model.json").unlink()  # a folder without "de-turbo" in its name is a Turbo model
    g = torch.Generator().manual_seed(3)
    modules = {
        path: LoraModule(torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 2.0)
        for path in ("layers.0.attention.to_q", "layers.1.attention.to_v", "layers.1.attention.to_k")
    }
    adapter = save_lora(home.home / "adapter.safetensors", modules, dtype=torch.float32, overwrite=True)
    resolved, run = _train(
        home, tmp_path / "run", model_path="tiny-turbo", training_adapter_path=str(adapter), num_steps=2,
        sample_every_n_steps=2, sample_prompt="a red circle", learning_rate=5e-2, output_name="turbo-sampled",
        sample_resolution=64,
    )  # fmt: skip
    assert resolved.config.use_training_adapter
    records = _records(run)
    assert [r["step"] for r in records] == [0, 2] and records[0]["steps"] == 8 and records[0]["cfg"] == 1.0
    # Step 0: the user's LoRA is zero, so the sample is the plain Turbo model: the adapter was reversed.
    plain = _reference(folder, None, records[0])
    assert np.abs(_pixels(run.path / records[0]["path"]) - plain).max() <= 2
    # The end: Turbo + the user's LoRA, exactly what the saved file does in a plain pipeline.
    want = _reference(folder, resolved.output_path, records[1])
    assert np.abs(_pixels(run.path / records[1]["path"]) - want).max() <= 2
    log = run.log_path.read_text()
    assert "Merged the training adapter adapter.safetensors at +1.0" in log and "Sampled 1 image(s) at step 2" in log
