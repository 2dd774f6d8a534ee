"""The validation loss: fixed images, noise and sigmas; reproducible; measuring changes no training state;
logged in metrics.jsonl and the registry, recorded by checkpoints, and the best checkpoint exported."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from train_support import fast_config, make_home, one_thread_per_module  # noqa: F401 - autouse

from zimage.cli import main
from zimage.config import ConfigError, MachineInfo, build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training.reporting import Reporter
from zimage.training.trainer import LoraTrainer
from zimage.training.validation import sigma_key, split_validation

CPU = MachineInfo(cuda=False, bf16=True)
SIGMAS = [0.2, 0.5, 0.8]
VAL = dict(validation_images="val-shapes", validation_sigmas=SIGMAS, validation_every_n_steps=2)


def _train(settings, run_id: str, **overrides) -> SimpleNamespace:
    config = fast_config(seed=11, num_steps=4, learning_rate=5e-3, output_name=run_id.replace("run-", "lora-"),
                         **overrides)  # fmt: skip
    resolved = validate_config(build_config(config), settings, CPU)
    run = RunFolder(settings.runs_dir / run_id)
    run.write_config(resolved.config.to_dict())
    trainer = LoraTrainer(resolved, settings, Reporter(run))
    trainer.setup()
    result = trainer.train()
    sizes = (len(trainer.training_set.items), len(trainer.validator.latents) if trainer.validator else 0)
    trainer.cleanup()
    run.update_status(kind="train", state="completed", step=result.steps, total_steps=4, name=run_id)
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(run=run, result=result, lines=lines, sizes=sizes)


def _tensors(path):
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    settings = make_home(tmp_path_factory.mktemp("val") / "home", tiny_model_dir)
    val = settings.datasets_dir / "val-shapes"
    shutil.copytree(settings.datasets_dir / "demo-shapes", val)
    for image in sorted((val / "images").glob("*.png"))[3:]:  # three validation images are enough
        image.unlink()
        image.with_suffix(".txt").unlink(missing_ok=True)
    plain = _train(settings, "run-plain")
    first = _train(settings, "run-val-a", save_every_n_steps=2, keep_last_n_checkpoints=0, **VAL)
    again = _train(settings, "run-val-b", **VAL)
    return SimpleNamespace(settings=settings, plain=plain, first=first, again=again)


def test_val_loss_is_logged_with_one_value_per_sigma(runs):
    val_lines = [r for r in runs.first.lines if "val_loss" in r]
    assert [r["step"] for r in val_lines] == [2, 4]  # every 2 steps (and at the end)
    for r in val_lines:
        per_sigma = [r[sigma_key(s)] for s in SIGMAS]
        assert all(v > 0 for v in per_sigma)
        assert r["val_loss"] == pytest.approx(sum(per_sigma) / len(per_sigma), rel=1e-9)
    assert runs.first.sizes == (16, 3)  # a separate dataset: the training set keeps all its images


def test_two_runs_with_the_same_seed_log_identical_val_loss(runs):
    def pick(lines):
        return [(r["step"], r["val_loss"], *(r[sigma_key(s)] for s in SIGMAS)) for r in lines if "val_loss" in r]

    assert pick(runs.first.lines) == pick(runs.again.lines) and len(pick(runs.first.lines)) == 2


def test_validation_changes_no_training_state(runs):
    plain, measured = _tensors(runs.plain.result.output_path), _tensors(runs.first.result.output_path)
    assert plain.keys() == measured.keys()
    assert all(torch.equal(plain[k], measured[k]) for k in plain)  # bit for bit
    assert [r["loss"] for r in runs.plain.lines] == [r["loss"] for r in runs.first.lines]
    assert not any("val_loss" in r for r in runs.plain.lines)


def test_checkpoints_record_val_loss_and_the_best_one_exports(runs, monkeypatch, capsys):
    from zimage.training.export import best_checkpoint

    by_step = {r["step"]: r["val_loss"] for r in runs.first.lines if "val_loss" in r}
    folder = runs.first.run.path / "checkpoints"
    for step, val in by_step.items():
        progress = json.loads((folder / f"step-{step:06d}" / "progress.json").read_text())
        assert progress["val_loss"] == val
    best, value = best_checkpoint(folder)
    assert value == min(by_step.values()) and best.step == min(by_step, key=by_step.get)
    monkeypatch.setenv("ZIMAGE_HOME", str(runs.settings.home))
    assert main(["runs", "export", "run-val-a", "--checkpoint", "best", "--name", "best-one"]) == 0
    out = runs.settings.loras_dir / "best-one.safetensors"
    assert f"exported step-{best.step:06d}" in capsys.readouterr().out
    assert out.read_bytes() == best.lora_path.read_bytes()
    assert main(["runs", "export", "run-plain", "--checkpoint", "best"]) == 2  # no checkpoint with a val_loss
    assert "recorded a val_loss" in capsys.readouterr().err


def test_the_registry_holds_val_loss_and_the_best_step(runs):
    from zimage.registry import Registry, metric_series, run_numbers
    from zimage.registry.ingest import Ingester

    reg = Registry(runs.settings.registry_dir / "test.duckdb")
    try:
        Ingester(reg, runs.settings).scan()
        series = metric_series(reg, "run-val-a", ["val_loss"])
        logged = {r["step"]: r["val_loss"] for r in runs.first.lines if "val_loss" in r}
        assert dict(zip(series["step"], series["last"], strict=True)) == pytest.approx(logged)
        nums = run_numbers(reg, ["run-val-a", "run-plain"]).set_index("run_id")
        assert nums.loc["run-val-a", "best_val_loss"] == pytest.approx(min(logged.values()))
        assert nums.loc["run-val-a", "best_val_step"] == min(logged, key=logged.get)
        assert nums.loc["run-val-a", "final_loss"] == pytest.approx(runs.first.lines[-1]["loss"])
        assert nums.loc["run-plain", "val_points"] == 0 and nums.loc["run-val-a", "val_points"] == 2
    finally:
        reg.close()


def test_a_held_out_fraction_is_split_off_the_training_set(runs):
    from zimage.data.training_set import scan_dataset

    ts = scan_dataset(runs.settings.datasets_dir / "demo-shapes", 256)
    train, val = split_validation(ts, 0.25, seed=3)
    assert len(val.items) == 4 and len(train.items) == 12
    assert not {i.name for i in train.items} & {i.name for i in val.items}
    assert [i.name for i in split_validation(ts, 0.25, seed=3)[1].items] == [i.name for i in val.items]
    resolved = validate_config(build_config(fast_config(validation_images=0.25, seed=3)), runs.settings, CPU)
    assert resolved.validation_fraction == 0.25 and resolved.validation_dir is None
    trainer = LoraTrainer(resolved, runs.settings, Reporter(RunFolder(runs.settings.home / "held-out")))
    trainer.setup()  # the trainer holds the same images out before it draws a batch
    try:
        assert [i.name for i in trainer.training_set.items] == [i.name for i in train.items]
        assert len(trainer.validator.latents) == 4 and trainer.sampler is not None
        assert len(trainer.features.latents) == 12
    finally:
        trainer.cleanup()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"validation_images": "no-such-set"}, "validation_images"),
        ({"validation_images": "1.5"}, "validation_images"),
        ({"validation_sigmas": [0.0, 0.5]}, "validation_sigmas"),
        ({"validation_sigmas": ["a"]}, "validation_sigmas"),
        ({"validation_every_n_steps": -1}, "validation_every_n_steps"),
    ],
)
def test_bad_validation_settings_name_the_field(runs, overrides, field):
    with pytest.raises(ConfigError) as err:
        validate_config(build_config(fast_config(**overrides)), runs.settings, CPU)
    assert [p.field for p in err.value.problems] == [field]
