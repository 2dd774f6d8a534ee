"""AppTest of the LoRAs page: a trained LoRA and a hand-copied one without metadata, details, samples,
download, a damaged file, delete behind a confirm, and a test grid queued for the picked LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from test_loras_library import modules, trained_lora

from zimage.training.lora_io import read_lora, save_lora

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "6_LoRAs.py")


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


@pytest.fixture()
def home(zhome):
    trained_lora(zhome)
    save_lora(zhome.models_dir / "loras" / "copied-in.safetensors", modules(rank=3, seed=2), None, torch.float32)
    (zhome.models_dir / "loras" / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    return zhome


def page(lora: str | None = None, name: str | None = "ann") -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=90)
    if lora:
        at.query_params["lora"] = lora
    if name:
        at.session_state["user_name"] = name
    return at.run()


def details(at) -> dict[str, str]:
    table = at.dataframe[1].value
    return dict(zip(table["field"], table["value"], strict=True))


def test_lists_trained_and_hand_copied_loras_with_a_damaged_one_named(home):
    at = page()
    assert not at.exception
    table = at.dataframe[0].value.set_index("name")
    assert set(table.index) == {"trained-one", "copied-in", "truncated"}
    assert table.loc["trained-one", "trigger word"] == "zzt" and table.loc["trained-one", "run"] == "run-trained-one"
    assert table.loc["copied-in", "base model"] == "unknown" and table.loc["copied-in", "rank"] == "3"
    assert table.loc["truncated", "state"] == "damaged"
    assert any("truncated" in w.value and "damaged" in w.value for w in at.warning)

    at.selectbox(key="loras_pick").set_value("copied-in").run()
    d = details(at)
    assert d["trigger word"] == "unknown" and d["state"] == "ok" and d["rank"] == "3 (from the weights)"
    assert at.query_params["lora"] in ("copied-in", ["copied-in"])


def test_details_samples_and_download_of_a_trained_lora(home):
    at = page("trained-one")
    assert not at.exception
    d = details(at)
    assert d["dataset"] == "demo-shapes" and d["dataset hash"] == "abc123" and d["owner"] == "ann"
    captions = [c for img in at.image for c in img.captions]
    assert len(captions) == 2 and all(c.startswith("step 6 · prompt ") for c in captions)  # step 6's, not 3's
    assert at.get("download_button")[0].proto.label == "Download"


def test_delete_asks_to_confirm_and_cancel_keeps_the_file(home):
    path = home.models_dir / "loras" / "copied-in.safetensors"
    at = page("copied-in")
    at.button(key="loras_delete").click().run()
    assert not at.exception and path.exists()
    assert any("Delete" in w.value and "cannot be undone" in w.value for w in at.warning)
    at.button(key="loras_delete_no").click().run()
    assert path.exists() and not any("cannot be undone" in w.value for w in at.warning)

    at.button(key="loras_delete").click().run()
    at.button(key="loras_delete_yes").click().run()
    assert not at.exception and not path.exists()
    assert any("Deleted copied-in.safetensors" in s.value for s in at.success)
    assert "copied-in" not in set(at.dataframe[0].value["name"])


def test_test_with_prompts_queues_a_testgrid_job_for_this_lora(home, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, home.base_models_dir / "tiny-zimage")
    at = page("trained-one")
    assert at.text_input(key="loras_test_model").value == "tiny-zimage"
    assert at.text_input(key="loras_test_prompt").value == "zzt, a red square"  # the run's sample prompt
    at.text_input(key="loras_test_strengths").input("0, 1")
    at.number_input(key="loras_test_size").set_value(64)
    at.button(key="loras_test_go").click().run()
    assert not at.exception and any("Queued test grid" in s.value for s in at.success), [e.value for e in at.error]
    (run_dir,) = [p for p in home.runs_dir.iterdir() if p.name != "run-trained-one"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["strengths"] == [0.0, 1.0] and config["model_path"] == "tiny-zimage"
    assert config["loras"] == [{"label": "trained-one", "path": str(home.loras_dir / "trained-one.safetensors")}]


def test_merge_on_the_page_writes_the_exact_merge(home):
    save_lora(home.models_dir / "loras" / "second.safetensors", modules(rank=2, seed=4), None, torch.float32)
    at = page()
    at.multiselect(key="loras_merge_pick").set_value(["trained-one", "second"])
    at.text_input(key="loras_merge_weights").input("0.8, 0.5")
    at.text_input(key="loras_merge_name").input("both")
    at.button(key="loras_merge_go").click().run()
    assert not at.exception and any("Merged into both.safetensors" in s.value for s in at.success), [
        e.value for e in at.error
    ]
    merged = read_lora(home.models_dir / "loras" / "merged" / "both.safetensors")
    assert merged.modules["layers.0.attention.to_q"].rank == 4
    at.text_input(key="loras_merge_weights").input("0.8")
    at.text_input(key="loras_merge_name").input("again")
    at.button(key="loras_merge_go").click().run()
    assert any("one weight per chosen LoRA (2)" in e.value for e in at.error)
