"""A quiet server: Streamlit's file watcher sees only code, never the data folders, even when the data lives
next to Home.py (a checkout keeps datasets/, registry/, models/ and cache/ there); and the log does not
repeat itself while nothing happens.

The real server runs from a copy of the app whose ZIMAGE_HOME is that copy's folder, with Streamlit's
debug log on (where its watcher names every event it handles), and a real browser session open (the
watchers belong to a session). Then many files are written in every data folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from browser_support import CHROMIUM_ARGS, chromium_path, free_port

ROOT = Path(__file__).resolve().parents[1]
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(chromium_path() is None, reason="no chromium on this machine")


def app_copy(root: Path) -> Path:
    """Home.py, pages/ and .streamlit/ as a checkout has them; the data folders go next to them."""
    app = root / "app"
    app.mkdir()
    shutil.copy2(ROOT / "Home.py", app / "Home.py")
    shutil.copytree(ROOT / "pages", app / "pages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / ".streamlit", app / ".streamlit")
    return app


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("streamlit did not start")


@pytest.mark.slow
def test_data_writes_never_reach_the_file_watcher_and_idle_polls_log_nothing(tmp_path):
    from zimage import jobs
    from zimage.captioning.config import caption_config
    from zimage.captioning.tiny import DEMO_CAPTIONER, write_demo_captioner
    from zimage.demo import DEMO_DATASET, write_demo_dataset
    from zimage.runfolder import FINAL_STATES, RunFolder
    from zimage.settings import Settings

    app = app_copy(tmp_path)
    settings = Settings(home=app).ensure()
    write_demo_dataset(settings.datasets_dir / DEMO_DATASET)
    write_demo_captioner(settings.captioners_dir / DEMO_CAPTIONER)
    port, log_path = free_port(), tmp_path / "server.log"
    env = dict(os.environ, ZIMAGE_HOME=str(app), PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "Home.py",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--logger.level",
        "debug",
    ]  # fmt: skip  (the project's config.toml)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(url)
            page.get_by_text("Z-Image LoRA Studio").first.wait_for(timeout=60_000)
            time.sleep(2)  # the session's watchers are registered after its first run
            idle_from = log_path.stat().st_size
            # A real job meanwhile: the app's scheduler starts the worker and follows it, tick after tick.
            run_id = jobs.enqueue(settings, "caption", caption_config(
                dataset=DEMO_DATASET, model=DEMO_CAPTIONER, images=["001.png"], num_beams=1, max_new_tokens=4,
            ), user="ann", name="caption-quiet")  # fmt: skip
            deadline = time.monotonic() + 90
            while RunFolder(settings.runs_dir / run_id).read_status().get("state") not in FINAL_STATES:
                assert time.monotonic() < deadline, "the caption job did not finish"
                time.sleep(0.5)
            time.sleep(4)  # idle again: the page's live panels and the scheduler poll meanwhile
            idle = log_path.read_bytes()[idle_from:].decode("utf-8", "replace")
            marks = []
            for folder in (settings.datasets_dir / DEMO_DATASET / "images", settings.runs_dir / "noise-run",
                           settings.cache_dir / "noise", settings.base_models_dir / "noise"):  # fmt: skip
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(150):
                    name = f"noise-{folder.name}-{i}.txt"
                    (folder / name).write_text("x")
                    (folder / name).write_text("xy")  # a modify event as well
                    marks.append(name)
            time.sleep(4)
            (app / "pages" / "1_Datasets.py").write_text((app / "pages" / "1_Datasets.py").read_text() + "\n")
            time.sleep(4)  # code still is watched: this edit must show up (the control for the check below)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log_path.read_text("utf-8", "replace")
    assert any("1_Datasets.py" in line and ("Path changed" in line or "Change detected" in line)
               for line in text.splitlines()), "the watcher did not report a code edit"  # fmt: skip
    seen = [line for line in text.splitlines() if "noise-" in line]
    assert not seen, f"the file watcher saw data files ({len(seen)} lines), e.g. {seen[:3]}"
    assert "Inotify queue overflowed" not in text
    zimage_lines = [line for line in idle.splitlines() if "zimage" in line and "streamlit" not in line.split(":")[0]]
    repeated = {line: n for line, n in Counter(zimage_lines).items() if n > 1}
    assert not repeated, f"the same line logged again and again while polling: {list(repeated)[:3]}"
    assert RunFolder(settings.runs_dir / run_id).read_status()["state"] == "completed"
    # the job's life is in the server log, one line per event
    events = [line for line in text.splitlines() if run_id in line and " zimage INFO " in line]
    assert [e.split(" zimage INFO ")[1].split()[0] for e in events] == ["started", "ended"], events
