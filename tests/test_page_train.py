"""AppTest of the Train page: defaults that follow the model, checks next to the fields, launch, presets, clone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from zimage.jobs import enqueue
from zimage.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "3_Train.py")


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    """The page starts the app's scheduler; here it only indexes (no worker is started)."""
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


def page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=90).run()


def value(at, name):
    return at.session_state["tr_" + name]


def column_errors(at, key: str) -> list[str]:
    """The error boxes in the same form column as the widget `key` (the messages shown next to it)."""
    for exp in at.expander:
        for col in exp.columns:
            keys = {w.key for kind in ("number_input", "text_input", "selectbox", "multiselect", "checkbox")
                    for w in getattr(col, kind)}  # fmt: skip
            if key in keys:
                return [e.value for e in col.error]
    raise AssertionError(f"no widget {key}")


def runs(settings) -> list[RunFolder]:
    return [RunFolder(p) for p in sorted(settings.runs_dir.iterdir()) if not p.name.startswith(".")]


def test_defaults_follow_the_model_and_turbo_switch_changes_sampling(zhome_demo):
    at = page()
    assert not at.exception and not at.error
    assert (value(at, "model_path"), value(at, "model_type"), value(at, "dataset_path")) == (
        "tiny-zimage", "de_turbo", "demo-shapes",
    )  # fmt: skip
    assert (value(at, "sample_steps"), value(at, "sample_cfg"), value(at, "lora_rank")) == (4, 2.0, 8)  # quick_test
    titles = [e.label for e in at.expander]
    assert titles[:5] == ["Basic", "LoRA", "Training", "Advanced", "Samples"]
    assert at.metric[0].label == "Estimated peak" and at.metric[0].value.endswith("GiB")
    assert any("CPU only" in i.value for i in at.info)
    at.selectbox(key="tr_model_type").set_value("turbo").run()
    assert (value(at, "sample_steps"), value(at, "sample_cfg"), value(at, "use_training_adapter")) == (8, 1.0, True)
    assert any("training adapter file" in e for e in column_errors(at, "tr_use_training_adapter"))
    at.selectbox(key="tr_model_type").set_value("de_turbo").run()
    assert (value(at, "sample_steps"), value(at, "sample_cfg"), value(at, "use_training_adapter")) == (4, 2.0, False)
    assert not at.error
    at.selectbox(key="tr_model_path").set_value("z-image-de-turbo").run()
    assert (value(at, "sample_steps"), value(at, "sample_cfg")) == (25, 3.0)
    assert any("not downloaded yet" in e for e in column_errors(at, "tr_model_path"))


def test_memory_estimate_follows_the_settings(zhome_demo):
    at = page()
    before = float(at.metric[0].value.split()[0])
    at.number_input(key="tr_resolution").set_value(1024).run()
    after = float(at.metric[0].value.split()[0])
    assert after > before
    assert len(at.get("vega_lite_chart")) == 1  # the breakdown chart


def test_invalid_settings_are_blocked_before_launch(zhome_demo):
    at = page()
    at.sidebar.text_input(key="user_name").input("alice")
    at.number_input(key="tr_resolution").set_value(1000)
    at.text_input(key="tr_output_name").input("../escape")
    at.selectbox(key="tr_mixed_precision").set_value("fp16").run()
    assert any("multiple of 16" in e for e in column_errors(at, "tr_resolution"))
    assert any("slashes" in e for e in column_errors(at, "tr_output_name"))
    assert any("needs a CUDA GPU" in e for e in column_errors(at, "tr_mixed_precision"))
    assert any("3 setting(s) need attention" in e.value for e in at.error)
    assert at.button(key="tr_launch").disabled  # a browser cannot press it (launch_run refuses too: test_views_train)
    assert not runs(zhome_demo)
    at.number_input(key="tr_resolution").set_value(256)
    at.text_input(key="tr_output_name").input("fine")
    at.selectbox(key="tr_mixed_precision").set_value("bf16").run()
    assert not at.error and not at.button(key="tr_launch").disabled


def test_launch_needs_a_name_then_queues_with_its_position(zhome_demo):
    at = page()
    at.number_input(key="tr_num_steps").set_value(7)
    at.button(key="tr_launch").click().run()
    assert any("Your name" in e.value for e in at.error) and not runs(zhome_demo)
    at.sidebar.text_input(key="user_name").input("alice")
    at.button(key="tr_launch").click().run()
    assert not at.exception
    (first,) = runs(zhome_demo)
    assert any(f"Queued run {first.run_id}: position 1 in the queue" in s.value for s in at.success)
    status, config = first.read_status(), json.loads(first.config_path.read_text())
    assert (status["state"], status["user"], status["kind"]) == ("queued", "alice", "train")
    assert (config["num_steps"], config["model_path"], config["output_name"]) == (7, "tiny-zimage", "quick_test")
    assert value(at, "output_name") == "quick_test-2"  # the next launch does not collide with the waiting run
    at.button(key="tr_launch").click().run()
    assert any("position 2 in the queue" in s.value for s in at.success) and len(runs(zhome_demo)) == 2
    at.text_input(key="tr_output_name").input("quick_test").run()
    assert any(first.run_id in e and "will write" in e for e in column_errors(at, "tr_output_name"))


def test_presets_apply_and_save(zhome_demo):
    at = page()
    at.selectbox(key="tr_preset").set_value("character_lora").run()
    assert (value(at, "lora_rank"), value(at, "num_steps"), value(at, "resolution")) == (32, 1500, 1024)
    assert value(at, "dataset_path") == "demo-shapes" and value(at, "model_path") == "tiny-zimage"
    at.number_input(key="tr_lora_rank").set_value(24)
    at.text_input(key="tr_preset_name").input("team-chars")
    at.button(key="tr_preset_save").click().run()
    assert any("Preset saved: team-chars.json" in s.value for s in at.success)
    assert json.loads((zhome_demo.home / "presets" / "team-chars.json").read_text())["lora_rank"] == 24
    assert "team-chars" in at.selectbox(key="tr_preset").options[-1]
    at.text_input(key="tr_preset_name").input("quick_test")
    at.button(key="tr_preset_save").click().run()
    assert any("shipped preset" in e.value for e in at.error)


def test_clone_by_link_and_resume_a_stopped_run(zhome_demo):
    from zimage.config import TrainingConfig

    cfg = TrainingConfig(model_path="tiny-zimage", dataset_path="demo-shapes", lora_rank=6, learning_rate=3e-4,
                         output_name="older", resolution=256, weight_decay=0.3).to_dict()  # fmt: skip
    run_id = enqueue(zhome_demo, "train", cfg, user="bob", name="older")
    RunFolder(zhome_demo.runs_dir / run_id).update_status(state="stopped", ended=1.0)
    at = AppTest.from_file(PAGE, default_timeout=90)
    at.query_params["clone"] = run_id
    at.run()
    assert (value(at, "lora_rank"), value(at, "learning_rate"), value(at, "resolution")) == (6, 3e-4, 256)
    assert value(at, "output_name") == "older" and at.session_state["tr__extra"]["weight_decay"] == 0.3
    assert any(f"Settings of {run_id} loaded" in s.value for s in at.success)
    at.selectbox(key="tr_earlier").set_value(run_id).run()
    assert not at.button(key="tr_resume").disabled
    at.button(key="tr_resume").click().run()
    assert any("requeued" in s.value for s in at.success)
    assert RunFolder(zhome_demo.runs_dir / run_id).read_status()["state"] == "queued"


def test_an_empty_home_explains_what_is_missing(zhome):
    at = page()
    assert not at.exception
    assert any("not downloaded yet" in e for e in column_errors(at, "tr_model_path"))
    assert any("required: a dataset name" in e for e in column_errors(at, "tr_dataset_path"))
    assert at.button(key="tr_launch").disabled
