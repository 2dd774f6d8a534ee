"""No traceback in the UI anywhere (issue 15, item 11): every page, after a run that failed with a Python
exception (a real worker process) and a run whose worker died (marked lost), shows the error itself and
says where the whole log is, never the frames of a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from support_worker import failed_and_lost_runs

from zimage.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
SUPPORT = Path(__file__).with_name("support_worker.py")
PAGES = ["Home.py", "pages/1_Datasets.py", "pages/2_Captioning.py", "pages/3_Train.py", "pages/4_Runs.py",
         "pages/5_Compare.py"]  # fmt: skip


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


def texts(at: AppTest) -> str:
    """Everything the page sent to the browser, as text (every element's message, expanders' contents too)."""
    out = []

    def walk(node):
        proto = getattr(node, "proto", None)
        if proto is not None:
            out.append(str(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return "\n".join(out)


@pytest.fixture()
def failed_and_lost(zhome_demo):
    failed_dir, lost_dir = failed_and_lost_runs(zhome_demo, fail_at=3)
    failed, lost = RunFolder(failed_dir), RunFolder(lost_dir)
    status = failed.read_status()
    assert status["state"] == "failed" and "Traceback" in status["traceback"]
    assert "Traceback (most recent call last)" in failed.log_path.read_text()  # the file keeps it all
    return zhome_demo, failed, lost


def test_no_page_shows_a_traceback(failed_and_lost):
    settings, failed, lost = failed_and_lost
    views = [(page, {}) for page in PAGES] + [
        ("pages/4_Runs.py", {"run": failed.path.name}),
        ("pages/4_Runs.py", {"run": lost.path.name}),
        ("pages/5_Compare.py", {"runs": f"{failed.path.name},{lost.path.name}"}),
    ]
    seen_error = seen_lost = False
    for page, query in views:
        at = AppTest.from_file(str(ROOT / page), default_timeout=90)
        at.query_params.update(query)
        at.run()
        assert not at.exception, (page, query, at.exception)
        text = texts(at)
        for bad in ("Traceback (most recent call last)", 'File "'):
            assert bad not in text, f"{page} {query}: {bad!r} shown"
        if query.get("run") == failed.path.name:
            seen_error = "support worker failure at step 3" in text  # the error itself is shown
            assert "lines of Python traceback left out" in text and str(failed.log_path) in text
        if query.get("run") == lost.path.name:
            seen_lost = "lost" in text
    assert seen_error and seen_lost
    assert json.loads((lost.path / "status.json").read_text())["state"] == "lost"
