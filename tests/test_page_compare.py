"""AppTest of the Compare page: overlaid curves, the settings that differ, the sample grid, test-grid jobs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from zimage.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "5_Compare.py")


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


def lora_file(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 32),
               "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.zeros(32, 2)}, str(path))  # fmt: skip
    return path


def make_run(settings, run_id, lr, created, step_time, val_best_at=None):
    """A finished run folder; with `val_best_at` every 10th line holds a val_loss, lowest at that step."""
    rf = RunFolder(settings.runs_dir / run_id)
    rf.write_config({"model_path": "tiny-zimage", "dataset_path": "demo-shapes", "learning_rate": lr, "lora_rank": 8,
                     "output_name": run_id, "sample_prompt": "zshape, a red circle"})  # fmt: skip
    out = lora_file(settings.loras_dir / f"{run_id}.safetensors")
    rf.update_status(state="completed", kind="train", user="ann", name=run_id, created=created, step=60,
                     total_steps=60, output_path=str(out))  # fmt: skip
    for s in range(1, 61):
        line = {"step": s, "loss": 1.0 / s if lr > 1e-4 else 2.0 / s, "lr": lr, "elapsed": s * step_time,
                "step_time": step_time, "mem_peak": 2**30 * lr * 1e4}  # fmt: skip
        if val_best_at is not None and s % 10 == 0:
            line.update({"val_loss": 0.5 + abs(s - val_best_at) / 100 + lr, "val_loss_0.5": 0.4})
        rf.append_metrics(line)
    (rf.path / "samples").mkdir()
    for step in (20, 40, 60):
        rel = f"samples/{step}.png"
        Image.new("RGB", (64, 64), (step * 4, 0, 0)).save(rf.path / rel)
        rf.append_sample({"step": step, "prompt": "zshape, a red circle", "seed": 42, "path": rel})
    (rf.checkpoints_dir / "step-000030").mkdir(parents=True)
    lora_file(rf.checkpoints_dir / "step-000030" / "lora.safetensors")


@pytest.fixture()
def two_runs(zhome_demo):
    now = time.time()
    make_run(zhome_demo, "run-slow", 1e-4, now - 100, step_time=2.0)
    make_run(zhome_demo, "run-fast", 3e-4, now - 50, step_time=0.5)
    return zhome_demo


def page(runs: str | None = "run-slow,run-fast") -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=90)
    if runs:
        at.query_params["runs"] = runs
    return at.run()


def chart_frame(at, index: int = 0):
    chart = at.get("vega_lite_chart")[index]  # 0: the curves; 1: the parallel coordinates
    return pa.ipc.open_stream(chart.proto.datasets[0].data.data).read_all().to_pandas(), json.loads(chart.proto.spec)


def test_curves_diff_and_sample_grid(two_runs):
    at = page()
    assert not at.exception and not at.error
    assert at.multiselect(key="cmp_runs").value == ["run-slow", "run-fast"]
    data, spec = chart_frame(at)
    assert (
        data.groupby("series").size().to_dict() == {s: 60 for s in data["series"].unique()}
        and data["series"].nunique() == 2
    )
    assert data["x"].max() == 60 and spec["layer"][0]["encoding"]["x"]["title"] == "step"
    at.radio(key="cmp_x").set_value("wall time").run()
    data, spec = chart_frame(at)
    slow = data[data["series"].str.startswith("run-slow")]
    assert slow["x"].max() == pytest.approx(2.0) and spec["layer"][0]["encoding"]["x"]["title"] == "wall time (min)"
    diff = at.dataframe[0].value
    assert list(diff.index) == ["learning_rate", "output_name"]  # only what differs
    assert diff.loc["learning_rate"].tolist() == ["0.0001", "0.0003"]
    assert len(at.image) == 6  # 2 runs x 3 steps, same prompt and seed
    assert [c.value for c in at.caption if c.value.startswith("step ")] == ["step 20", "step 40", "step 60"]


def test_one_run_and_no_runs(zhome_demo):
    at = page(None)
    assert not at.exception and any("No training runs yet" in i.value for i in at.info)
    make_run(zhome_demo, "solo", 1e-4, time.time(), 1.0)
    # The scheduler from the first page run is already up: read the new run now rather than racing its
    # file watch (in the app a person takes longer than that to open the page).
    from zimage.jobs.scheduler import refresh_run

    refresh_run(zhome_demo, "solo")
    at = page("solo")
    assert any("Pick a second run" in c.value for c in at.caption)


def test_test_grid_job_is_queued_with_the_chosen_loras(two_runs):
    at = page()
    loras = at.multiselect(key="cmp_grid_loras")
    assert sorted(loras.options) == ["run-fast (final)", "run-fast @ step 30", "run-slow (final)", "run-slow @ step 30"]
    assert len(loras.value) == 4  # all chosen by default (up to four)
    at.button(key="cmp_grid_go").click().run()
    assert any("Your name" in e.value for e in at.error)
    at.sidebar.text_input(key="user_name").input("carol")
    at.text_input(key="cmp_grid_strengths").input("0, lots")
    at.button(key="cmp_grid_go").click().run()
    assert any("Strengths" in e.value for e in at.error)
    at.text_input(key="cmp_grid_strengths").input("0, 0.5, 1")
    at.number_input(key="cmp_grid_size").set_value(64)
    at.button(key="cmp_grid_go").click().run()
    assert not at.error, [e.value for e in at.error]
    jobs = [p for p in two_runs.runs_dir.iterdir() if (p / "status.json").exists()
            and json.loads((p / "status.json").read_text())["kind"] == "testgrid"]  # fmt: skip
    (job,) = jobs
    config, status = json.loads((job / "config.json").read_text()), json.loads((job / "status.json").read_text())
    assert status["state"] == "queued" and status["user"] == "carol"
    assert config["strengths"] == [0.0, 0.5, 1.0] and config["width"] == 64 and config["model_path"] == "tiny-zimage"
    assert {Path(item["path"]).name for item in config["loras"]} == {"run-slow.safetensors", "run-fast.safetensors",
                                                                      "lora.safetensors"}  # fmt: skip
    assert any(f"Queued test grid {job.name}" in s.value for s in at.success)
    assert any("queued" in p.proto.text for p in at.get("progress"))


def test_finished_grid_is_shown(two_runs):
    rf = RunFolder(two_runs.runs_dir / "grid-done")
    rf.write_config({"model_path": "tiny-zimage", "prompt": "p", "strengths": [0, 1], "loras": []})
    rf.update_status(
        state="completed", kind="testgrid", name="grid-run-fast", step=2, total_steps=2, created=time.time()
    )
    Image.new("RGB", (300, 100), "white").save(rf.path / "grid.png")
    at = page()
    assert any("grid-done: rows = LoRAs" in c for img in at.image for c in img.captions)
    assert any(p.proto.text == "grid-run-fast · step 2 / 2 (100%) · completed" for p in at.get("progress"))


@pytest.fixture()
def three_runs(zhome_demo):
    now = time.time()
    for i, (lr, best) in enumerate(((1e-4, 30), (3e-4, 40), (1e-3, 20))):
        make_run(zhome_demo, f"run-lr{i}", lr, now - 100 + i, step_time=0.5 + i, val_best_at=best)
    return zhome_demo


def test_numbers_table_csv_and_parallel_coordinates_over_a_learning_rate_sweep(three_runs):
    at = page("run-lr0,run-lr1,run-lr2")
    assert not at.exception and not at.error
    table = at.dataframe[1].value  # 0: the settings that differ
    assert list(table["run"].str.split(" ").str[0]) == ["run-lr0", "run-lr1", "run-lr2"]
    assert table["best val step"].tolist() == [30, 40, 20]
    assert table["best val_loss"].tolist() == pytest.approx([0.5 + 1e-4, 0.5 + 3e-4, 0.5 + 1e-3])
    assert table["final loss"].tolist() == pytest.approx([2.0 / 60, 1.0 / 60, 1.0 / 60])
    assert table["s/step"].tolist() == pytest.approx([0.5, 1.5, 2.5])
    assert table["peak memory (GiB)"].tolist() == pytest.approx([1.0, 3.0, 10.0])
    assert table["learning_rate"].tolist() == [1e-4, 3e-4, 1e-3] and "output_name" not in table
    (csv,) = at.get("download_button")
    assert csv.proto.label == "Download CSV"
    data, spec = chart_frame(at, 1)
    assert set(data["axis"]) == {"learning_rate", "best val_loss"} and data["run"].nunique() == 3
    lr_axis = data[data["axis"] == "learning_rate"].set_index("value")["level"]
    assert lr_axis.to_dict() == pytest.approx({"0.0001": 0.0, "0.0003": 2 / 9, "0.001": 1.0})
    assert "best val_loss" in json.dumps(spec)


def test_numbers_table_as_csv_holds_every_run(three_runs):
    from zimage.registry import Registry, config_diff, run_numbers
    from zimage.registry.ingest import Ingester
    from zimage.views import compare as cv

    reg = Registry(three_runs.registry_dir / "csv-test.duckdb")
    Ingester(reg, three_runs).scan()
    ids = [f"run-lr{i}" for i in range(3)]
    try:
        table = cv.numbers_table(run_numbers(reg, ids), config_diff(reg, ids), {r: r for r in ids}, ids)
    finally:
        reg.close()
    lines = cv.table_csv(table).decode().splitlines()
    assert lines[0].startswith("run,final loss,best val_loss,best val step,s/step,peak memory (GiB),learning_rate")
    assert [ln.split(",")[0] for ln in lines[1:]] == ids and lines[3].split(",")[3] == "20"
