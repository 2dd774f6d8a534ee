"""AppTest of the Runs page for a run that measured a validation loss: its chart beside the training loss,
the best val_loss and its step in the summary, and the best checkpoint offered for download."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from zimage.runfolder import RunFolder

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "4_Runs.py")


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


def test_val_loss_chart_summary_and_best_checkpoint(zhome):
    rf = RunFolder(zhome.runs_dir / "r-val")
    rf.write_config({"dataset_path": "demo-shapes", "output_name": "r-val", "model_path": "tiny-zimage"})
    rf.update_status(state="completed", kind="train", user="ann", name="r-val", created=time.time(), step=30,
                     total_steps=30)  # fmt: skip
    vals = {10: 0.71, 20: 0.64, 30: 0.69}
    for s in range(1, 31):
        rf.append_metrics({"step": s, "loss": 1.0 / s, "lr": 1e-4, "step_time": 0.5,
                           **({"val_loss": vals[s], "val_loss_0.5": vals[s]} if s in vals else {})})  # fmt: skip
    for step in (10, 20, 30):
        folder = rf.checkpoints_dir / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "lora.safetensors").write_bytes(f"weights {step}".encode())
        (folder / "progress.json").write_text(f'{{"step": {step}, "complete": true, "val_loss": {vals[step]}}}')
    at = AppTest.from_file(PAGE, default_timeout=90)
    at.query_params["run"] = "r-val"
    at.run()
    assert not at.exception and not at.error
    assert any(c.value == "best val_loss 0.64 at step 20 (3 measured)" for c in at.caption)
    charts = {}
    for chart in at.get("vega_lite_chart"):
        data = pa.ipc.open_stream(chart.proto.datasets[0].data.data).read_all().to_pandas()
        charts[tuple(sorted(data["series"].unique()))] = data
    val = charts[("val_loss",)]
    assert dict(zip(val["x"], val["value"], strict=True)) == vals
    table = next(df.value for df in at.dataframe if "checkpoint" in df.value.columns)
    assert table["val_loss"].tolist() == ["0.71", "0.64", "0.69"]  # from each checkpoint's progress.json
    (best,) = [b for b in at.get("download_button") if "best checkpoint" in b.proto.label]
    assert best.proto.label == "Download the best checkpoint (step 20, lowest val_loss)"
