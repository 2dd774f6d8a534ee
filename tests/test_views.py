"""zimage.views: formatting, EMA, chart data, the runs table, run actions, sample grids, test-grid choices."""

from __future__ import annotations

import json
import math
import time

import pandas as pd
import pytest
from PIL import Image

from zimage.errors import UserError
from zimage.views import charts, compare, home, runs
from zimage.views.format import clock, duration, fraction, number, progress_text, state_text


def test_durations_clock_and_progress_text():
    assert [duration(s) for s in (None, float("nan"), -3, 5, 65, 3600 + 125, 2 * 86400 + 7200)] == [
        "", "", "0 s", "5 s", "1 min 05 s", "1 h 02 min", "2 d 2 h",
    ]  # fmt: skip
    now = time.mktime((2026, 3, 4, 15, 0, 0, 0, 0, -1))
    assert clock(now - 3600, now) == "14:00"
    assert clock(now - 2 * 86400, now) == "2026-03-02 15:00"
    assert clock(None) == ""
    assert fraction(50, 200) == 0.25 and fraction(300, 200) == 1.0 and fraction(5, None) == 0.0
    assert progress_text(45, 100, 190, "running") == "step 45 / 100 (45%) · running · ETA 3 min 10 s"
    assert progress_text(100, 100, 0, "completed") == "step 100 / 100 (100%) · completed"
    assert progress_text(3, None, None, "queued") == "step 3 · queued"
    assert number(0.012345) == "0.01235" and number(2e-5) == "2.000e-05" and number(None) == ""


def test_ema_debiased_and_skips_nan():
    assert charts.ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    out = charts.ema([1.0, 1.0, 1.0], 0.9)
    assert out == pytest.approx([1.0, 1.0, 1.0])  # debiasing: a constant stays constant from the first point
    smooth = charts.ema([0.0, 10.0], 0.5)
    assert smooth[1] == pytest.approx((0.5 * 0.0 * 0.5 + 0.5 * 10.0) / (1 - 0.25))
    with_gap = charts.ema([1.0, float("nan"), 3.0], 0.5)
    assert with_gap[1] == with_gap[0] and not math.isnan(with_gap[2])


def _series(run_id, metric, values, start=1):
    return pd.DataFrame(
        {"run_id": run_id, "metric": metric, "bucket": range(len(values)), "step": range(start, start + len(values)),
         "step_first": range(start, start + len(values)), "min": values, "max": values, "last": values, "n": 1}
    )  # fmt: skip


def test_series_frame_and_chart_layers():
    df = pd.concat(
        [_series("a", "loss", [4.0, 2.0, 1.0]), _series("b", "loss", [3.0, 0.0]), _series("a", "lr", [1, 1, 1])]
    )
    frame = charts.series_frame(df, "loss", 0.5, labels={"a": "run A"})
    assert set(frame["series"]) == {"run A", "b"} and len(frame) == 5
    assert list(frame[frame["series"] == "run A"]["x"]) == [1, 2, 3]
    wall = {"a": (pd.Series([1, 3]).to_numpy(float), pd.Series([10.0, 30.0]).to_numpy(float))}
    moved = charts.series_frame(df, "loss", 0.0, x_of=wall)
    assert list(moved[moved["series"] == "a"]["x"]) == [10.0, 20.0, 30.0]  # interpolated step -> minutes
    spec = charts.metric_chart(frame, "loss", log_y=True, smoothed=True).to_dict()
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["area", "line", "line", "circle"]
    assert spec["layer"][1]["encoding"]["y"]["scale"]["type"] == "log"
    values = next(iter(spec["datasets"].values()))
    assert all(v["value"] > 0 for v in values)  # the zero loss of run b cannot sit on a log axis
    bars = charts.memory_chart([{"phase": "training", "item": "weights", "gib": 1.5}]).to_dict()
    assert bars["mark"]["type"] == "bar"


def _runs_df(**over):
    row = {"run_id": "r1", "name": "my-lora", "output_name": "my-lora", "state": "running", "user": "ann",
           "dataset": "pets", "progress": 0.5, "step": 50, "total_steps": 100, "last_loss": 0.1234567, "eta": 125.0,
           "started": time.time() - 60, "created": time.time() - 70, "heartbeat": time.time() - 2}  # fmt: skip
    row.update(over)
    return pd.DataFrame([row])


def test_runs_table_formats_progress_eta_and_time():
    table = runs.runs_table(_runs_df())
    row = table.iloc[0]
    assert list(table.columns) == runs.TABLE_COLUMNS
    assert (row["run"], row["state"], row["progress"], row["steps"], row["last loss"], row["ETA"]) == (
        "r1", "running", 50.0, "50 / 100", "0.1235", "2 min 05 s",
    )  # fmt: skip
    done = runs.runs_table(_runs_df(state="completed", progress=1.0)).iloc[0]
    assert done["ETA"] == "" and done["progress"] == 100.0
    assert runs.runs_table(pd.DataFrame()).empty


def test_actions_follow_the_state():
    on = lambda state: sorted(a for a, ok in runs.action_states(state).items() if ok)  # noqa: E731
    assert on("queued") == ["stop"]
    assert on("running") == ["pause", "sample_now", "save_now", "stop"]
    assert on("paused") == ["resume", "sample_now", "save_now", "stop"]
    assert on("stopped") == on("failed") == on("lost") == ["resume"]
    assert on("completed") == on("stopping") == []


def test_log_tail_reads_the_end(tmp_path):
    (tmp_path / "log.txt").write_text("".join(f"line {i}\n" for i in range(5000)))
    tail = runs.log_tail(tmp_path, lines=3)
    assert tail.splitlines() == ["line 4997", "line 4998", "line 4999"]
    assert runs.log_tail(tmp_path / "missing") == ""


def test_thumbnails_are_cached_outside_the_run_folder(zhome, tmp_path):
    img = tmp_path / "sample.png"
    Image.new("RGB", (640, 320), (200, 10, 10)).save(img)
    thumb = runs.thumbnail(zhome, img)
    assert thumb is not None and zhome.cache_dir in thumb.parents
    with Image.open(thumb) as t:
        assert t.size == (runs.THUMB_SIZE, runs.THUMB_SIZE)  # a letterboxed square tile (tests/test_thumbnails.py)
    assert runs.thumbnail(zhome, img) == thumb
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert runs.thumbnail(zhome, tmp_path / "broken.png") is None


def _samples(rows):
    return pd.DataFrame(rows, columns=["step", "prompt", "seed", "path"])


def test_sample_grid_rows_runs_columns_steps():
    a = _samples([(s, "a cat", 1, f"a{s}.png") for s in range(100, 1100, 100)] + [(100, "a dog", 2, "ad.png")])
    b = _samples([(200, "a cat", 1, "b200.png"), (400, "a cat", 1, "b400.png")])
    by_run = {"A": a, "B": b, "C": _samples([])}
    keys = compare.sample_keys(by_run)
    assert keys[0] == ("a cat", 1) and ("a dog", 2) in keys
    steps, grid = compare.sample_grid(by_run, ("a cat", 1), max_steps=4)
    assert len(steps) == 4 and steps[0] == 100 and steps[-1] == 1000
    assert grid["A"] == [f"a{s}.png" for s in steps] and grid["C"] == [None] * 4
    steps, grid = compare.sample_grid(by_run, ("a cat", 1), max_steps=20)
    assert grid["B"][steps.index(200)] == "b200.png" and grid["B"][steps.index(300)] is None


def test_test_grid_choices_and_strengths(tmp_path):
    final = tmp_path / "final.safetensors"
    final.write_bytes(b"x")
    ck_dir = tmp_path / "step-000200"
    ck_dir.mkdir()
    (ck_dir / "optimizer.safetensors").write_bytes(b"x")
    (ck_dir / "my_lora.safetensors").write_bytes(b"x")
    ck_file = tmp_path / "step-000100.safetensors"
    ck_file.write_bytes(b"x")
    assert compare.checkpoint_lora(ck_dir) == ck_dir / "my_lora.safetensors"
    assert compare.checkpoint_lora(tmp_path / "state.pt") is None
    details = [{"run_id": "r1", "name": "cats", "output_path": str(final), "status": {}}]
    ckpts = pd.DataFrame([{"name": "step-000100.safetensors", "step": 100, "path": str(ck_file)},
                          {"name": "step-000200", "step": 200, "path": str(ck_dir)}])  # fmt: skip
    choices = compare.lora_choices(details, {"r1": ckpts})
    assert list(choices.values()) == ["cats (final)", "cats @ step 200", "cats @ step 100"]
    assert compare.parse_strengths("0, 0.5;1 1.5") == [0.0, 0.5, 1.0, 1.5]
    with pytest.raises(UserError, match="Strengths"):
        compare.parse_strengths("0, strong")
    cfg = compare.testgrid_config("tiny-zimage", "a cat", 7, "0, 1", {str(final): "cats (final)"}, 256)
    assert cfg["loras"] == [{"label": "cats (final)", "path": str(final)}] and cfg["strengths"] == [0.0, 1.0]
    assert (cfg["width"], cfg["height"], cfg["seed"]) == (256, 256, 7)
    json.dumps(cfg)  # it goes into config.json


def test_diff_table_and_labels():
    df = pd.DataFrame([{"run_id": "r1", "name": "x", "state": "completed", "started": None, "created": 0},
                       {"run_id": "r2", "name": "x", "state": "completed", "started": None, "created": 0}])  # fmt: skip
    labels = compare.run_labels(df)
    assert len(set(labels.values())) == 2  # same name and time: made unique
    diff = pd.DataFrame({"r1": [1e-4, None], "r2": [2e-4, "[1, 2]"]}, index=["learning_rate", "x"])
    table = compare.diff_table(diff, labels)
    assert list(table.columns) == [labels["r1"], labels["r2"]] and table.iloc[1, 0] == ""
    assert compare.parse_runs_param("r2, nope,r1,r2", ["r1", "r2"]) == ["r2", "r1"]


def test_home_helpers(zhome):
    from zimage.system import GpuInfo

    rows = home.gpu_rows([GpuInfo(0, "H100", 80 * 1024**3, 20 * 1024**3)])
    assert rows == [{"GPU": 0, "name": "H100", "job": "free", "memory in use": "20.0 GB of 80.0 GB",
                     "memory %": 25.0, "utilisation %": None, "processes": 0}]  # fmt: skip
    assert home.disk_rows({"datasets": 2048, "free": 10})[0] == ("Datasets", "2.0 KB")
    for name in ("old", "new"):
        (zhome.loras_dir / f"{name}.safetensors").write_bytes(b"0" * 10)
        time.sleep(0.01)
    assert [r["LoRA"] for r in home.recent_loras(zhome)] == ["new", "old"]
    q = pd.DataFrame([{"position": 1.0, "run_id": "r1", "kind": "train", "name": "n", "user": "u", "state": "queued"},
                      {"position": float("nan"), "run_id": "r2", "kind": "train", "name": "m", "user": "u",
                       "state": "running"}])  # fmt: skip
    assert [r["position"] for r in home.queue_rows(q)] == ["1", ""]
    ((run_id, frac, text),) = home.active_progress(_runs_df(kind="train"))
    assert run_id == "r1" and frac == 0.5 and text.startswith("my-lora (train, ann) · step 50 / 100")


def test_shown_errors_turns_errors_into_one_message():
    from zimage.views import shown_errors

    shown: list[str] = []
    with shown_errors(shown.append):
        raise UserError("dataset_path: no such dataset")
    with shown_errors(shown.append):
        raise KeyError("boom")
    assert shown == ["dataset_path: no such dataset",
                     "Something went wrong: KeyError: 'boom'. The details are in the server log."]  # fmt: skip

    class Stop(BaseException):  # Streamlit's stop / rerun signals are BaseExceptions
        pass

    with pytest.raises(Stop), shown_errors(shown.append):
        raise Stop()
    assert len(shown) == 2


def test_a_live_run_that_went_quiet_is_marked_silent():
    now = 1_000_000.0
    assert state_text("running", now - 5, now) == "running"
    assert state_text("running", now - 300, now) == "running · silent 5 min 00 s"
    assert state_text("paused", now - 91, now) == "paused · silent 1 min 31 s"
    assert state_text("completed", now - 300, now) == "completed"  # a finished run has nothing to say
    assert state_text("queued", None, now) == "queued" and state_text(None) == ""

    quiet = _runs_df(heartbeat=time.time() - 600)
    assert runs.runs_table(quiet).iloc[0]["state"].startswith("running · silent 10 min")
    assert "silent 10 min" in home.active_progress(quiet.assign(kind="train"))[0][2]
    assert "silent" not in home.active_progress(_runs_df(kind="train"))[0][2]
    warning = runs.silence_warning({"state": "running", "heartbeat": now - 300}, now)
    assert "for 5 min 00 s" in warning and "Stop" in warning
    assert runs.silence_warning({"state": "running", "heartbeat": now - 3}, now) is None
