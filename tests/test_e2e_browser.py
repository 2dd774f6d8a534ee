"""End to end in a real browser: the real app server on a free port, Debian's headless Chromium driven by
Playwright. Create a dataset from 4 demo images on the Datasets page (and a bad file, refused), give every
caption a prefix with a trailing space, launch a tiny `quick_test` run from the Train page (the app's own
scheduler runs it), go to Runs and back by the sidebar and find the form as it was, launch a second run,
watch the Runs table show it `completed` without a reload, see its sample, compare both runs (one colour
each) with a test grid rendered by a background job, walk every page after a failed and a lost run and find
no traceback, and save a screenshot of each screen (also to $ZIMAGE_SCREENSHOTS_DIR when set)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
from browser_support import CHROMIUM_ARGS, chromium_path, settle, streamlit_server
from support_worker import failed_and_lost_runs

from zimage.runfolder import read_json
from zimage.views.charts import RUN_COLOURS

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-and-browsers")]  # see pyproject: --dist loadgroup
playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
if chromium_path() is None:
    pytest.skip("Debian's chromium is not installed (bash scripts/install_browser.sh)", allow_module_level=True)

STEPS = 4  # each tiny run: a few steps at 256 px, so both finish in well under a minute on 2 CPU cores
LONGER = 12  # the second run: still running when the Runs page opens, so the table is seen to change by itself
WAIT_MS = 120_000


@pytest.fixture()
def home(tmp_path, tiny_model_dir, monkeypatch):
    """A ZIMAGE_HOME with only the tiny model (the dataset is made through the UI); workers killed afterwards."""
    from zimage.settings import Settings
    from zimage.tiny import TINY_MODEL_NAME

    monkeypatch.delenv("ZIMAGE_SCHEDULER_LAUNCH", raising=False)  # the app must start the queued runs
    settings = Settings(home=tmp_path / "home").ensure()
    shutil.copytree(tiny_model_dir, settings.base_models_dir / TINY_MODEL_NAME)
    yield settings
    for run_dir in settings.runs_dir.glob("*"):
        for rec in (read_json(run_dir / "status.json", {}), read_json(run_dir / "launch.json", {})):
            pid = (rec or {}).get("pid")
            if pid and rec.get("state") not in ("completed", "stopped", "failed", "lost"):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture()
def demo_images(tmp_path) -> list[Path]:
    """The demo dataset's images and captions, as files a person would upload."""
    from zimage.demo import write_demo_dataset

    write_demo_dataset(tmp_path / "demo-src", count=4)
    bad = tmp_path / "demo-src" / "images" / "broken.png"
    bad.write_bytes(b"this is not a PNG")  # a bad upload: refused with the reason, nothing else changes
    return sorted((tmp_path / "demo-src" / "images").iterdir())


def shot(page, name: str, folders: list[Path], height: int = 1300) -> None:
    """Save the screen; Streamlit scrolls inside its own container, so a long page gets a taller window."""
    page.set_viewport_size({"width": 1500, "height": height})
    page.wait_for_timeout(800)  # let charts and images paint
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def fill_number(page, label: str, value: str, shown: str | None = None) -> None:
    settle(page)
    box = page.get_by_label(label, exact=True)
    box.fill(value)
    box.press("Enter")
    settle(page)
    assert page.get_by_label(label, exact=True).input_value() == (shown or value)


def open_group(page, title: str) -> None:
    """Open the Train form's expander `title` unless it is open already."""
    settle(page)
    details = page.locator("details", has=page.locator("summary", has_text=title)).first
    if details.get_attribute("open") is None:
        details.locator("summary").click()
        page.wait_for_timeout(300)


def sidebar_link(page, name: str):
    """The page's link in the sidebar navigation (following it keeps the browser session; goto would not)."""
    return page.locator("[data-testid='stSidebarNav'] a").filter(has_text=name).first


def chart_colours(chart, path: Path) -> dict[str, int]:
    """How many pixels of the chart's screenshot are (nearly) each of the first two run colours."""
    from PIL import Image

    chart.screenshot(path=str(path))
    pixels = list(Image.open(path).convert("RGB").getdata())
    out = {}
    for colour in RUN_COLOURS[:2]:
        rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
        out[colour] = sum(1 for p in pixels if sum(abs(a - b) for a, b in zip(p, rgb, strict=True)) < 24)
    return out


CONFIRMATION = re.compile(r"Queued run (\S+): position \d|Run (\S+) has started\.")


def launch(page, before: str | None = None) -> str:
    """Press Launch and return the new run's id from the confirmation.

    The confirmation says "Queued run X: position N" and, once the scheduler has started the run (which can be
    quicker than the browser looks), "Run X has started."; either one names the run. `before` is the run an
    earlier launch confirmed: its note may still be on the page until the rerun replaces it.
    """
    settle(page)
    page.get_by_role("button", name="Launch").click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for note in page.get_by_text(CONFIRMATION).all():
            try:
                found = CONFIRMATION.search(note.inner_text(timeout=1_000))
            except Exception:  # the element went away with a rerun
                continue
            run_id = found and (found.group(1) or found.group(2))
            if run_id and run_id != before:
                return run_id
        page.wait_for_timeout(250)
    name = page.get_by_label("Your name (recorded on the runs you start)").input_value()
    body = page.inner_text("body")
    problems = [ln for ln in body.splitlines() if "Not launched" in ln or "type it in the sidebar" in ln]
    raise AssertionError(f"no confirmation of a new run after Launch (name box {name!r}; {problems}); the page says:\n"
                         + body[-3000:])  # fmt: skip


def test_dataset_train_watch_compare_in_a_browser(home, demo_images, tmp_path):
    shots = [tmp_path / "screenshots"]
    if os.environ.get("ZIMAGE_SCREENSHOTS_DIR"):
        shots.append(Path(os.environ["ZIMAGE_SCREENSHOTS_DIR"]))
    log = tmp_path / "server.log"
    with streamlit_server(home.home, log) as url, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1300})
        page.set_default_timeout(30_000)

        # 1. Datasets: create one and upload the demo images with their captions
        page.goto(f"{url}/Datasets")
        page.get_by_label("Name (lowercase letters, digits, - and _)").fill("e2e-shapes")
        page.get_by_label("Trigger word").first.fill("zshape")
        page.get_by_role("button", name="Create dataset").click()
        page.get_by_text("Created dataset e2e-shapes.").wait_for()
        page.get_by_role("tab", name="Upload").click()
        page.locator("input[type=file]").first.set_input_files([str(p) for p in demo_images])
        page.get_by_text(demo_images[-1].name).first.wait_for()
        page.get_by_role("button", name="Add to dataset").click()
        page.get_by_text(re.compile(r"4 image\(s\) added, 4 with caption, 1 refused")).first.wait_for(state="attached")
        images = home.datasets_dir / "e2e-shapes" / "images"
        assert len(list(images.glob("*.png"))) == 4 and len(list(images.glob("*.txt"))) == 4
        settle(page)
        shot(page, "datasets", shots)

        # ... every caption gets a prefix that ends in a space, exactly as typed (previewed first)
        page.get_by_role("tab", name="Bulk edit").click()
        page.get_by_label("Add prefix").fill("photo of sks, ")
        page.get_by_label("Add prefix").press("Enter")
        settle(page)
        page.get_by_text("photo of sks, zshape, a red circle").first.wait_for(state="attached")  # the preview
        before = {p.name: p.read_text() for p in images.glob("*.txt")}
        assert all(not t.startswith("photo of sks") for t in before.values())  # a preview writes nothing
        page.get_by_role("button", name="Apply").click()
        page.get_by_text("4 caption(s) changed").wait_for()
        after = {p.name: p.read_text().strip() for p in images.glob("*.txt")}
        assert after == {n: "photo of sks, " + t.strip() for n, t in before.items()}

        # 2. Train: quick_test on the tiny model, tiny settings, launched twice (the second: rank 4, lr 0.02)
        page.goto(f"{url}/Train")
        page.get_by_label("Your name (recorded on the runs you start)").wait_for()
        settle(page)  # as a person does: type once the page is drawn
        page.get_by_label("Your name (recorded on the runs you start)").fill("e2e")
        page.get_by_label("Your name (recorded on the runs you start)").press("Enter")
        settle(page)
        assert page.get_by_label("Your name (recorded on the runs you start)").input_value() == "e2e"
        open_group(page, "Training")
        fill_number(page, "Steps", str(STEPS))
        fill_number(page, "Resolution", "256")
        first = launch(page)

        # Away to Runs and back by the sidebar (the same browser session): the form is as it was and usable
        sidebar_link(page, "Runs").click()
        page.get_by_text("Search").first.wait_for()
        settle(page)
        sidebar_link(page, "Train").click()
        settle(page)
        open_group(page, "Training")
        assert page.get_by_label("Steps", exact=True).input_value() == str(STEPS)
        open_group(page, "Basic")
        assert page.get_by_label("Resolution", exact=True).input_value() == "256"
        assert page.get_by_label("Steps", exact=True).is_enabled()
        assert "created with a default value" not in page.inner_text("body")
        open_group(page, "Training")
        fill_number(page, "Steps", str(LONGER))
        open_group(page, "LoRA")
        fill_number(page, "Rank (dim)", "4")
        open_group(page, "Training")
        fill_number(page, "Learning rate", "0.02", shown="2.00e-2")
        second = launch(page, before=first)
        config = read_json(home.runs_dir / second / "config.json")
        assert (config["lora_rank"], config["learning_rate"], config["num_steps"]) == (4, 0.02, LONGER)
        shot(page, "train", shots)

        # Links between pages keep the browser session: the name typed on Train is still there on Compare,
        # after Runs, a page without a name field
        page.get_by_role("link", name="Watch it on the Runs page").click()
        page.wait_for_url(re.compile(rf"/Runs\?run={re.escape(second)}"))
        page.get_by_role("link", name="Compare with other runs").click()
        page.wait_for_url(re.compile(r"/Compare\?runs="))
        name_field = page.get_by_label("Your name (recorded on the jobs you start)")
        name_field.wait_for()
        assert name_field.input_value() == "e2e"

        # 3. Home: the queue while the runs wait or train
        page.goto(url)
        page.get_by_text("Queue", exact=True).wait_for()
        page.get_by_text(second).first.wait_for(state="attached")  # dataframe cells live on a canvas
        shot(page, "home", shots)

        # 4. Runs: the table follows the second run (queued behind the first) to `completed` by itself: no reload
        page.goto(f"{url}/Runs?run={second}")
        row = page.locator("[data-testid='stDataFrame'] tr").filter(has_text=second)
        row.first.wait_for(state="attached")
        assert "completed" not in row.first.text_content()  # still queued or running when the page was drawn
        row.filter(has_text="completed").first.wait_for(state="attached", timeout=WAIT_MS)
        page.get_by_text(f"step {LONGER} / {LONGER} (100%) · completed").wait_for(timeout=WAIT_MS)
        page.locator(".vega-embed").first.wait_for()  # the Altair charts
        page.get_by_text("Samples", exact=True).wait_for()  # quick_test draws a sample: a first run shows it
        page.locator("[data-testid='stImage'] img").first.wait_for()
        assert read_json(home.runs_dir / first / "status.json")["state"] == "completed"
        assert (home.loras_dir / "quick_test.safetensors").is_file()
        assert (home.loras_dir / "quick_test-2.safetensors").is_file()
        shot(page, "runs", shots)

        # 5. Compare: both runs, the settings that differ, overlaid curves
        page.goto(f"{url}/Compare?runs={first},{second}")
        page.get_by_text("Settings that differ", exact=True).wait_for()
        page.get_by_text("lora_rank").first.wait_for(state="attached")  # dataframe cells live on a canvas
        page.locator(".vega-embed").first.wait_for()
        settle(page)
        drawn = chart_colours(page.locator(".vega-embed").first, tmp_path / "curves.png")
        assert drawn[RUN_COLOURS[0]] > 30 and drawn[RUN_COLOURS[1]] > 30, drawn  # two runs, two colours
        # ... and a test grid of both LoRAs at strengths 0 and 1, rendered by a background job
        page.get_by_label("Your name (recorded on the jobs you start)").fill("e2e")
        page.get_by_label("Your name (recorded on the jobs you start)").press("Enter")
        settle(page)
        page.get_by_label("Strengths").fill("0, 1")
        page.get_by_label("Size", exact=True).fill("128")
        page.get_by_role("button", name="Render test grid").click()
        page.get_by_text("Queued test grid").wait_for()
        page.get_by_text("rows = LoRAs, columns = strengths").wait_for(timeout=WAIT_MS)
        (grid_dir,) = [p for p in home.runs_dir.iterdir() if (p / "grid.png").exists()]
        assert read_json(grid_dir / "status.json")["state"] == "completed"
        assert len(list((grid_dir / "cells").glob("*.png"))) == 4
        shot(page, "compare", shots, height=2300)

        # 6. A failed run (a real worker's exception) and a lost one: every page names the problem, none shows a
        # traceback
        failed, lost = (p.name for p in failed_and_lost_runs(home, dataset="e2e-shapes"))
        assert read_json(home.runs_dir / failed / "status.json")["state"] == "failed"
        walk = [("", "Z-Image LoRA Studio"), ("/Datasets", "Datasets"), ("/Captioning", "Captioning"),
                ("/Train", "Train"), ("/LoRAs", "LoRAs"), (f"/Runs?run={failed}", "fails · failed"),
                (f"/Runs?run={lost}", "dies · lost"), (f"/Compare?runs={failed},{lost}", "Compare")]  # fmt: skip
        for path, heading in walk:
            page.goto(f"{url}{path}")
            page.get_by_role("heading", name=heading).first.wait_for(timeout=WAIT_MS)  # the page is drawn
            settle(page)
            page.wait_for_timeout(1000)  # and its live parts have had their first tick
            text = page.inner_text("body")
            for bad in ("Traceback (most recent call last)", 'File "'):
                assert bad not in text, f"{path}: {bad!r} on the page"
            if path.endswith(failed):
                assert "support worker failure at step 2" in text
        browser.close()
    server_log = log.read_text(errors="replace")  # the server has stopped: its whole life is in the log
    for bad in ("Traceback", "interpreter shutdown", "terminate called"):
        assert bad not in server_log, f"{bad!r} in the server log {log}"
