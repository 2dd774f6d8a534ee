"""The Train form behind the page: values <-> config, model-aware defaults, checks by field, presets, launch."""

from __future__ import annotations

import json

import pytest

from zimage.config import PRESETS
from zimage.errors import UserError
from zimage.runfolder import RunFolder
from zimage.views import launch, presets
from zimage.views import train_form as tf
from zimage.views.memory import memory_view


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


def form(settings, preset="quick_test", **changes):
    state: dict = {}
    tf.apply_values(state, presets.preset_values(settings, preset, {}))
    for k, v in changes.items():
        state[tf.KEY + k] = v
    return state


def test_preset_values_follow_the_model_and_dataset_on_disk(zhome_demo):
    state = form(zhome_demo)
    values = tf.read_values(state)
    assert (values["model_path"], values["model_type"], values["dataset_path"]) == (
        "tiny-zimage",
        "de_turbo",
        "demo-shapes",
    )
    assert (values["sample_steps"], values["sample_cfg"], values["use_training_adapter"]) == (4, 2.0, False)
    assert (values["lora_rank"], values["num_steps"], values["output_name"]) == (8, 100, "quick_test")
    assert isinstance(state[tf.KEY + "lora_alpha"], float) and isinstance(state[tf.KEY + "resolution"], int)
    assert set(tf.FIELD_NAMES) <= set(values) and "config_version" in state[tf.EXTRA_KEY]
    config = tf.config_from_values(values)
    assert config.trigger_word is None  # an empty trigger word follows the dataset
    problems, resolved = tf.check(values, zhome_demo)
    assert problems == {} and resolved.config.trigger_word == "zshape"


def test_switching_model_type_changes_sampling_and_adapter(zhome_demo):
    state = form(zhome_demo)
    state[tf.KEY + "model_type"] = "turbo"
    tf.on_model_type_change(state, zhome_demo)
    assert (state[tf.KEY + "sample_steps"], state[tf.KEY + "sample_cfg"], state[tf.KEY + "use_training_adapter"]) == (
        8,
        1.0,
        True,
    )
    state[tf.KEY + "model_type"] = "de_turbo"
    tf.on_model_type_change(state, zhome_demo)
    assert (state[tf.KEY + "sample_steps"], state[tf.KEY + "sample_cfg"]) == (4, 2.0)  # the tiny model's own
    state[tf.KEY + "model_path"] = "z-image-turbo"
    tf.on_model_change(state, zhome_demo)
    assert (state[tf.KEY + "model_type"], state[tf.KEY + "sample_steps"], state[tf.KEY + "sample_cfg"]) == (
        "turbo",
        8,
        1.0,
    )
    state[tf.KEY + "model_path"] = "z-image-de-turbo"
    tf.on_model_change(state, zhome_demo)
    assert (state[tf.KEY + "model_type"], state[tf.KEY + "sample_steps"], state[tf.KEY + "sample_cfg"]) == (
        "de_turbo",
        25,
        3.0,
    )
    problems, resolved = tf.check(tf.read_values(state), zhome_demo)
    assert resolved is None and "not downloaded yet" in problems["model_path"][0]


def test_checks_are_keyed_by_field(zhome_demo):
    values = tf.read_values(form(zhome_demo, resolution=1000, output_name="../up", mixed_precision="fp16", lora_rank=0))
    problems, resolved = tf.check(values, zhome_demo)
    assert resolved is None
    assert "multiple of 16" in problems["resolution"][0]
    assert "slashes" in problems["output_name"][0]
    assert "CUDA" in problems["mixed_precision"][0]
    assert ">= 1" in problems["lora_rank"][0]
    busy = {"quick_test": "20260101-000000-quick-test-abcd"}
    problems, _ = tf.check(tf.read_values(form(zhome_demo)), zhome_demo, busy)
    assert "20260101-000000-quick-test-abcd" in problems["output_name"][0]
    assert tf.unplaced({"training_adapter_path": ["must be .safetensors"], "resolution": ["x"]}) == [
        "training_adapter_path: must be .safetensors"
    ]


def test_free_output_name_skips_existing_files_and_busy_names(zhome_demo):
    (zhome_demo.loras_dir / "cat.safetensors").write_bytes(b"")
    assert tf.free_output_name(zhome_demo, "cat") == "cat-2"
    assert tf.free_output_name(zhome_demo, "cat", taken=["cat-2"]) == "cat-3"
    assert presets.preset_values(zhome_demo, "quick_test", {}, taken=["quick_test"])["output_name"] == "quick_test-2"


def test_saved_presets_round_trip_and_refusals(zhome_demo):
    values = tf.read_values(form(zhome_demo, lora_rank=12, learning_rate=3e-4))
    path = presets.save_preset(zhome_demo, "my-cats", values)
    saved = json.loads(path.read_text())
    assert saved["lora_rank"] == 12 and "dataset_path" not in saved
    assert presets.preset_names(zhome_demo) == [*PRESETS, "my-cats"]
    assert presets.preset_label("my-cats") == "my-cats (saved)"
    again = presets.preset_values(zhome_demo, "my-cats", {"dataset_path": "demo-shapes"})
    assert again["lora_rank"] == 12 and again["learning_rate"] == 3e-4 and again["dataset_path"] == "demo-shapes"
    with pytest.raises(UserError, match="exists already"):
        presets.save_preset(zhome_demo, "my-cats", values)
    presets.save_preset(zhome_demo, "my-cats", {**values, "lora_rank": 4}, overwrite=True)
    assert presets.read_preset(zhome_demo, "my-cats")["lora_rank"] == 4
    with pytest.raises(UserError, match="shipped preset"):
        presets.save_preset(zhome_demo, "quick_test", values)
    with pytest.raises(UserError, match="preset name"):
        presets.save_preset(zhome_demo, "../x", values)
    (presets.presets_dir(zhome_demo) / "broken.json").write_text('{"lora_rnk": 3}')
    with pytest.raises(UserError, match="lora_rank"):  # unknown key, with the suggestion
        presets.read_preset(zhome_demo, "broken")


def test_clone_values_keep_hidden_fields(zhome_demo):
    config = tf.config_from_values(tf.read_values(form(zhome_demo))).replace(weight_decay=0.2, lora_rank=6)
    values = presets.run_values(zhome_demo, config.to_dict(), taken=["quick_test"])
    state: dict = {}
    tf.apply_values(state, values)
    again = tf.config_from_values(tf.read_values(state))
    assert again.weight_decay == 0.2 and again.lora_rank == 6 and again.output_name == "quick_test-2"
    with pytest.raises(UserError, match="cannot be loaded"):
        presets.run_values(zhome_demo, {"no_such_field": 1})


def test_memory_view_breakdown_grows_with_resolution(zhome_demo):
    small = memory_view(tf.config_from_values(tf.read_values(form(zhome_demo, resolution=256))), zhome_demo, [])
    big = memory_view(tf.config_from_values(tf.read_values(form(zhome_demo, resolution=1024))), zhome_demo, [])
    assert big.peak_gib > small.peak_gib > 0
    assert {r["phase"] for r in small.rows} >= {"training", "latent caching"}
    assert sum(r["gib"] for r in small.rows if r["phase"] == small.peak_phase) == pytest.approx(
        small.peak_gib, rel=1e-2
    )
    assert small.fits is None and small.fit.startswith("CPU only")
    real = tf.config_from_values(tf.read_values(form(zhome_demo, model_path="z-image-turbo", resolution=1024)))
    from zimage.system import GpuInfo

    view = memory_view(real, zhome_demo, [GpuInfo(0, "Small GPU", 8 * 1024**3, 0)])
    assert view.fits is False and "Too big for Small GPU" in view.fit and view.peak_gib > 8


def test_launch_queues_the_run_and_reports_its_position(zhome_demo):
    values = tf.read_values(form(zhome_demo, num_steps=5))
    with pytest.raises(UserError, match="Your name"):
        launch.launch_run(zhome_demo, values, None, {})
    assert not any(zhome_demo.runs_dir.iterdir())
    run_id, position, following = launch.launch_run(zhome_demo, values, "ann", {})
    status = RunFolder(zhome_demo.runs_dir / run_id).read_status()
    config = json.loads((zhome_demo.runs_dir / run_id / "config.json").read_text())
    assert (status["state"], status["kind"], status["user"], position) == ("queued", "train", "ann", 1)
    assert config["num_steps"] == 5 and config["model_path"] == "tiny-zimage" and following == "quick_test-2"
    second, position2, _ = launch.launch_run(
        zhome_demo, {**values, "output_name": following}, "bob", {"quick_test": run_id}
    )
    assert position2 == 2 and launch.position_text(second, 2).endswith("position 2 in the queue.")
    with pytest.raises(UserError, match="need attention"):
        launch.launch_run(zhome_demo, values, "ann", {"quick_test": run_id})
    assert len(list(zhome_demo.runs_dir.iterdir())) == 2
