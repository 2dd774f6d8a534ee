"""Page state that holds: what a person typed on a page is still there after visiting another page and coming
back, with no widget left broken and no "created with a default value" warning (issue 15, item 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


def widget(at, key):
    for kind in ("text_input", "text_area", "number_input", "selectbox", "multiselect", "checkbox", "radio",
                 "slider", "toggle"):  # fmt: skip
        for w in getattr(at, kind):
            if w.key == key:
                return w
    raise AssertionError(f"no widget with key {key!r} on the page")


# page -> the values a person sets there (widget key -> value)
EDITS = {
    "pages/3_Train.py": {
        "tr_output_name": "nav-check",
        "tr_lora_rank": 12,
        "tr_num_steps": 150,
        "tr_preset_name": "mine",
        "tr_train_text_encoder": True,
    },
    "pages/1_Datasets.py": {"bulk_prefix": "photo of sks, ", "bulk_find": "shape", "bulk_uncaptioned": True},
    "pages/2_Captioning.py": {"cap_batch": 8, "cap_detail": "detailed", "cap_mode": "all", "cap_beams": 5},
    "pages/5_Compare.py": {},
    "pages/4_Runs.py": {"runs_search": "shapes"},
}


@pytest.mark.parametrize("page", [p for p, edits in EDITS.items() if edits])
def test_values_survive_a_visit_to_another_page(zhome_demo, page):
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=90).run()
    at.switch_page(page).run()
    assert not at.exception
    for key, value in EDITS[page].items():
        widget(at, key).set_value(value)
    at.run()
    other = "pages/4_Runs.py" if page != "pages/4_Runs.py" else "pages/3_Train.py"
    at.switch_page(other).run()
    assert not at.exception
    at.switch_page(page).run()
    assert not at.exception
    for key, value in EDITS[page].items():
        w = widget(at, key)
        assert w.value == value, f"{page}: {key} came back as {w.value!r}, not {value!r}"
        assert not w.disabled, f"{page}: {key} is disabled after navigation"
    warnings = [w.value for w in at.warning]
    assert not [w for w in warnings if "default value" in w], warnings


def fresh(page: str, **params) -> AppTest:
    at = AppTest.from_file(str(ROOT / page), default_timeout=90)
    at.query_params.update(params)
    return at.run()


def test_a_link_opens_the_same_view(zhome_demo):
    from zimage.data import manage
    from zimage.views import presets

    manage.create_dataset(zhome_demo, "second")
    at = fresh("pages/1_Datasets.py", dataset="second")
    assert at.selectbox(key="dataset").value == "second"
    at = fresh("pages/2_Captioning.py", dataset="second")
    assert at.selectbox(key="dataset").value == "second"
    at = fresh("pages/4_Runs.py", runs_search="nothing-matches-this")
    assert at.text_input(key="runs_search").value == "nothing-matches-this"

    # Train: the linked preset's values are the ones in the form (not the first preset's under another name)
    first = presets.preset_values(zhome_demo, "quick_test", {})
    linked = presets.preset_values(zhome_demo, "style_lora", {})
    differing = [k for k in linked if linked[k] != first.get(k) and k != "output_name"]
    assert differing, "the two presets should differ somewhere"
    at = fresh("pages/3_Train.py", tr_preset="style_lora", tr_dataset_path="second")
    assert not at.exception
    assert at.session_state["tr_preset"] == "style_lora"
    assert at.session_state["tr_dataset_path"] == "second"
    for key in differing:
        assert at.session_state["tr_" + key] == linked[key], key
    # an unknown preset or dataset in a link falls back to the defaults instead of failing
    at = fresh("pages/3_Train.py", tr_preset="no-such", tr_dataset_path="no-such")
    assert not at.exception and at.session_state["tr_preset"] == "quick_test"
    assert at.session_state["tr_dataset_path"] in ("demo-shapes", "second")


def test_the_url_never_carries_the_user(zhome_demo):
    for page in ("pages/3_Train.py", "pages/4_Runs.py", "pages/5_Compare.py", "pages/1_Datasets.py"):
        at = AppTest.from_file(str(ROOT / page), default_timeout=90)
        at.session_state["user_name"] = "ann"
        at.run()
        assert not at.exception
        assert "user_name" not in at.query_params and "ann" not in str(at.query_params.values()), page


def test_a_link_wins_over_the_run_kept_in_the_session(zhome_demo):
    """A kept choice must not swallow a link: `?run=` and `?runs=` open what they name."""
    import time

    from test_page_compare import make_run

    now = time.time()
    make_run(zhome_demo, "run-a", 1e-4, now - 100, step_time=2.0)
    make_run(zhome_demo, "run-b", 3e-4, now - 50, step_time=0.5)
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=90).run()
    at.switch_page("pages/4_Runs.py").run()
    at.selectbox(key="runs_pick").set_value("run-b").run()
    at.switch_page("pages/5_Compare.py").run()
    at.query_params["run"] = "run-a"
    at.switch_page("pages/4_Runs.py").run()
    assert not at.exception and at.selectbox(key="runs_pick").value == "run-a"

    at.query_params["runs"] = "run-b"
    at.switch_page("pages/5_Compare.py").run()
    assert not at.exception and at.multiselect(key="cmp_runs").value == ["run-b"]
    at.multiselect(key="cmp_runs").set_value(["run-a", "run-b"]).run()
    at.switch_page("pages/4_Runs.py").run()
    at.switch_page("pages/5_Compare.py").run()
    assert at.multiselect(key="cmp_runs").value == ["run-a", "run-b"]
