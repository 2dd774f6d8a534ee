"""AppTest of the Captioning page: who starts a job, what gets queued, how a running job is shown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from zimage.captioning.tiny import DEMO_CAPTIONER, write_demo_captioner, write_tiny_blip
from zimage.runfolder import RunFolder
from zimage.users import current_user, login_name

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "2_Captioning.py")


@pytest.fixture(autouse=True)
def _no_job_launches(monkeypatch):
    """The page starts this host's scheduler; here it may index runs but must not launch workers, so the
    queued jobs stay as the page left them (the worker itself is tested in test_captioning.py)."""
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")


def app() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["dataset"] = "demo-shapes"
    return at


def progress_texts(at) -> list[str]:
    return [p.proto.text for p in at.get("progress")]


def only_run(settings) -> RunFolder:
    runs = [p for p in settings.runs_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1
    return RunFolder(runs[0])


def test_a_name_is_needed_then_the_job_is_queued(zhome_demo):
    at = app().run()
    assert not at.exception
    at.button(key="cap_start").click().run()
    assert any("type it in the sidebar" in e.value for e in at.error)
    assert not any(zhome_demo.runs_dir.iterdir())
    at.sidebar.text_input(key="user_name").input("alice")
    at.radio(key="cap_detail").set_value("detailed")
    at.radio(key="cap_mode").set_value("all")
    at.button(key="cap_start").click().run()  # florence-2-base: not here, and this host is offline
    assert any(e.value.startswith("Florence-2 is not downloaded; run `zimage models download florence-2-base` where "
                                  "there is network, or set HF_HOME") for e in at.error)  # fmt: skip
    assert not any(zhome_demo.runs_dir.iterdir())
    write_demo_captioner(zhome_demo.captioners_dir / DEMO_CAPTIONER)  # what `zimage demo` adds
    at.run()
    assert at.selectbox(key="cap_model").value == "florence-2-base"  # the person's choice stays
    at.selectbox(key="cap_model").set_value(DEMO_CAPTIONER)
    at.button(key="cap_start").click().run()
    assert not at.error and any("Queued captioning job" in s.value for s in at.success)
    run = only_run(zhome_demo)
    config = json.loads(run.config_path.read_text())
    assert (config["dataset"], config["model"], config["detail"], config["mode"]) == (
        "demo-shapes", DEMO_CAPTIONER, "detailed", "all",
    )  # fmt: skip
    assert config["trigger_prefix"] is True and config["download"] is True
    status = run.read_status()
    assert (status["state"], status["kind"], status["user"]) == ("queued", "caption", "alice")
    assert any(run.run_id in t and "queued" in t for t in progress_texts(at))


def test_logged_in_user_and_custom_model(zhome_demo):
    at = app()
    at.user = {"is_logged_in": True, "email": "bob@example.com", "name": "Bob"}
    at.run()
    assert not [t for t in at.sidebar.text_input if t.key == "user_name"]  # no name box when logged in
    at.selectbox(key="cap_model").set_value("other").run()
    at.text_input(key="cap_model_custom").input("../../etc")
    at.button(key="cap_start").click().run()
    assert any("not a captioner name" in e.value for e in at.error)
    at.text_input(key="cap_model_custom").input("Salesforce/blip-image-captioning-large")
    at.text_input(key="cap_prompt").input("a photograph of")
    at.button(key="cap_start").click().run()
    assert any("is not downloaded; run `zimage models download blip-large`" in e.value for e in at.error)  # offline
    folder = zhome_demo.home / "my-blip"
    write_tiny_blip(folder)
    at.text_input(key="cap_model_custom").input(str(folder))
    at.button(key="cap_start").click().run()
    run = only_run(zhome_demo)
    config = json.loads(run.config_path.read_text())
    assert config["model"] == str(folder) and config["prompt"] == "a photograph of"
    assert run.read_status()["user"] == "bob@example.com"


def test_running_job_shows_progress_errors_and_stops(zhome_demo):
    from zimage.jobs import enqueue

    run_id = enqueue(zhome_demo, "caption", {"kind": "caption", "dataset": "demo-shapes", "model": "blip-base"})
    run = RunFolder(zhome_demo.runs_dir / run_id)
    run.update_status(state="running", step=2, total_steps=5, current_file="003.png", error_count=1,
                      errors=[{"file": "002.png", "error": "not an image PIL can decode"}])  # fmt: skip
    at = app().run()
    assert any("2/5 images" in t and "1 errors" in t and "running" in t for t in progress_texts(at))
    assert any("now: 003.png" in c.value for c in at.caption)
    errors = next(df.value for df in at.dataframe if "error" in df.value.columns)
    assert errors.to_dict("records") == [{"file": "002.png", "error": "not an image PIL can decode"}]
    at.button(key=f"stop_{run_id}").click().run()
    assert [r["action"] for r in json.loads(run.control_path.read_text())["requests"]] == ["stop"]


def test_page_without_datasets_says_where_to_start(zhome):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception and any("Datasets page" in i.value for i in at.info)


def test_current_user_rules():
    assert login_name({"email": "test@example.com"}) is None  # st.user without login configured
    assert current_user({"is_logged_in": True, "email": "a@b.c"}, "typed") == "a@b.c"
    assert current_user({"is_logged_in": False}, "  carol ") == "carol"
    assert current_user({}, "") is None
