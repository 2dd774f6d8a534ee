"""AppTest of the Runs page over real run folders and the real registry: table, filters, one run's detail,
progress, charts, samples, checkpoints, log, controls and download."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from zimage.runfolder import RunFolder, process_start_time

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "4_Runs.py")


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


def make_run(settings, run_id, state, steps=0, total=100, created=0.0, **status):
    rf = RunFolder(settings.runs_dir / run_id)
    rf.write_config(
        {"dataset_path": "demo-shapes", "output_name": run_id, "model_path": "tiny-zimage", "num_steps": total}
    )
    rf.update_status(state=state, kind="train", user="ann", name=run_id, created=created, started=created + 1,
                     step=steps, total_steps=total, **status)  # fmt: skip
    for s in range(1, steps + 1):
        rf.append_metrics({"step": s, "loss": 1.0 / s, "lr": 1e-4, "step_time": 0.5, "mem_allocated": 2**30,
                           "mem_peak": 2**31, "elapsed": s * 0.5, "eta": (total - s) * 0.5})  # fmt: skip
    rf.log(f"{run_id} started")
    rf.log(f"{run_id} at step {steps}")
    return rf


@pytest.fixture()
def home(zhome):
    now = time.time()
    done = make_run(
        zhome,
        "r-done",
        "completed",
        steps=100,
        created=now - 300,
        output_path=str(zhome.loras_dir / "r-done.safetensors"),
    )
    (zhome.loras_dir / "r-done.safetensors").write_bytes(b"LoRA bytes")
    for step, colour in ((50, (200, 0, 0)), (100, (0, 0, 200))):
        for seed in (1, 2):
            rel = f"samples/step{step}-{seed}.png"
            (done.path / "samples").mkdir(exist_ok=True)
            Image.new("RGB", (96, 64), colour).save(done.path / rel)
            done.append_sample({"step": step, "prompt": "a red ball", "seed": seed, "path": rel})
    (done.checkpoints_dir / "step-000050").mkdir(parents=True)
    me = os.getpid()  # a live "worker", so the scheduler does not mark the run lost
    make_run(zhome, "r-live", "running", steps=40, created=now - 200, pid=me, pid_start_time=process_start_time(me),
             heartbeat=now)  # fmt: skip
    make_run(
        zhome,
        "r-fail",
        "failed",
        steps=12,
        created=now - 100,
        error="The loss became NaN at step 12; lower the learning rate",
    )
    make_run(zhome, "r-queued", "queued", created=now - 50, queue_order=now)
    return zhome


def page(run_id: str | None = None) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=90)
    if run_id:
        at.query_params["run"] = run_id
    return at.run()


def chart_rows(chart) -> int:
    return pa.ipc.open_stream(chart.proto.datasets[0].data.data).read_all().num_rows


def buttons(at) -> dict[str, bool]:
    return {b.label: not b.disabled for b in at.button}


def test_table_lists_runs_and_filters(home):
    at = page()
    assert not at.exception
    table = at.dataframe[0].value.set_index("run")
    assert list(table.index) == ["r-queued", "r-fail", "r-live", "r-done"]  # newest first
    assert table.loc["r-live", "progress"] == 40.0 and table.loc["r-live", "steps"] == "40 / 100"
    assert table.loc["r-live", "ETA"] == "30 s" and table.loc["r-done", "last loss"] == "0.01"
    assert table.loc["r-done", "state"] == "completed" and table.loc["r-fail", "user"] == "ann"
    at.multiselect(key="runs_state").set_value(["running", "failed"]).run()
    assert list(at.dataframe[0].value["run"]) == ["r-fail", "r-live"]
    at.text_input(key="runs_search").input("r-fa").run()
    assert list(at.dataframe[0].value["run"]) == ["r-fail"]


def test_live_run_progress_charts_and_controls(home):
    at = page("r-live")
    assert not at.exception and at.selectbox(key="runs_pick").value == "r-live"
    assert at.query_params["run"] == ["r-live"] or at.query_params["run"] == "r-live"
    (bar,) = at.get("progress")
    assert bar.proto.text == "step 40 / 100 (40%) · running · ETA 30 s" and bar.proto.value == 40
    assert buttons(at) == {"Stop": True, "Pause": True, "Resume": False, "Save now": True, "Sample now": True}
    charts = at.get("vega_lite_chart")
    assert len(charts) == 4 and chart_rows(charts[0]) == 40  # loss, lr, step time, memory
    assert json.loads(charts[0].proto.spec)["layer"][2]["mark"]["type"] == "line"  # the smoothed line
    at.toggle(key="run_log").set_value(True)
    at.slider(key="run_smoothing").set_value(0.0).run()
    spec = json.loads(at.get("vega_lite_chart")[0].proto.spec)
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["area", "line", "circle"]  # no smoothed line
    assert spec["layer"][1]["encoding"]["y"]["scale"]["type"] == "log"
    at.button(key="run_pause").click().run()
    control = json.loads((home.runs_dir / "r-live" / "control.json").read_text())
    assert [r["action"] for r in control["requests"]] == ["pause"]
    assert any("pause requested" in t.value for t in at.toast)
    assert "r-live at step 40" in at.code[0].value


def test_finished_run_samples_checkpoints_download(home):
    at = page("r-done")
    assert not at.exception
    assert at.get("progress")[0].proto.text == "step 100 / 100 (100%) · completed"
    # AppTest runs the page on its own, where st.page_link cannot resolve pages: plain links stand in
    links = [m.value for m in at.markdown]
    assert "[Clone these settings on the Train page](Train?clone=r-done)" in links
    assert "[Compare with other runs](Compare?runs=r-done)" in links
    assert buttons(at)["Stop"] is False and buttons(at)["Resume"] is False
    download = at.get("download_button")[0]
    assert not download.proto.disabled and download.proto.label == "Download LoRA"
    images = at.image
    assert len(images) == 2 and all("a red ball · seed" in c for img in images for c in img.captions)
    at.select_slider(key="run_sample_step").set_value(50).run()
    thumbs = sorted((home.cache_dir / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 4  # both steps, two seeds each, cached outside the run folder
    with Image.open(thumbs[0]) as t:
        assert t.size == (96, 96)  # letterboxed square, never enlarged (tests/test_thumbnails.py)
    ckpt = next(df.value for df in at.dataframe if "checkpoint" in df.value.columns)
    assert list(ckpt["checkpoint"]) == ["step-000050"] and list(ckpt["step"]) == [50]


def test_failed_run_shows_the_reason_and_can_resume(home):
    at = page("r-fail")
    assert not at.exception
    assert any(e.value == "The loss became NaN at step 12; lower the learning rate" for e in at.error)
    assert buttons(at)["Resume"] is True and buttons(at)["Stop"] is False
    at.button(key="run_resume").click().run()
    assert RunFolder(home.runs_dir / "r-fail").read_status()["state"] == "queued"
    assert any("requeued" in t.value for t in at.toast)


def test_queued_run_and_unknown_link(home):
    at = page("r-queued")
    assert buttons(at) == {"Stop": True, "Pause": False, "Resume": False, "Save now": False, "Sample now": False}
    assert any("No metrics yet" in i.value for i in at.info)
    at.button(key="run_stop").click().run()
    status = RunFolder(home.runs_dir / "r-queued").read_status()
    assert status["state"] == "stopped" and status["cancelled"] is True
    other = page("no-such-run")
    assert not other.exception and other.selectbox(key="runs_pick").value == "r-queued"


def test_empty_registry_says_how_to_start(zhome):
    at = page()
    assert not at.exception and any("Start one on the Train page" in i.value for i in at.info)


def test_a_live_run_whose_worker_went_quiet_is_flagged(home):
    """The process is alive (so not lost), but status.json has not been stamped for 10 minutes."""
    path = home.runs_dir / "r-live" / "status.json"
    status = json.loads(path.read_text())
    status["heartbeat"] = time.time() - 600
    path.write_text(json.dumps(status))
    at = page()
    assert not at.exception
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["r-live", "state"].startswith("running · silent 10 min")
    at = page("r-live")
    assert any("No heartbeat from this run's worker for 10 min" in w.value for w in at.warning)
    assert not any("No heartbeat" in w.value for w in page("r-done").warning)
