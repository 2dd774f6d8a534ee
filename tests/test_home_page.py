import os
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from zimage.jobs import enqueue
from zimage.runfolder import RunFolder, process_start_time

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    """Home starts the app's scheduler; in tests it only indexes (no worker is started)."""
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


def test_home_lists_demo_model_and_dataset(zhome_demo):
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    assert not at.exception
    frames = [df.value for df in at.dataframe]
    models = next(f for f in frames if "type" in f.columns and "sampling" in f.columns)
    tiny = models[models["name"] == "tiny-zimage"].iloc[0]
    assert tiny["status"] == "ready" and tiny["type"] == "de_turbo"
    datasets = next(f for f in frames if "trigger word" in f.columns)
    row = datasets[datasets["name"] == "demo-shapes"].iloc[0]
    assert row["trigger word"] == "zshape" and row["images"] >= 12 and row["captioned"] == row["images"]


def test_home_on_empty_home_says_how_to_start(zhome):
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    assert not at.exception
    assert any("zimage demo" in i.value for i in at.info)
    assert any("Nothing queued or running" in c.value for c in at.caption)
    assert any("No trained LoRA yet" in c.value for c in at.caption)


def test_home_shows_machine_queue_active_runs_and_recent_loras(zhome_demo):
    import torch

    queued = enqueue(
        zhome_demo, "train", {"output_name": "cats", "dataset_path": "demo-shapes"}, user="ann", name="cats"
    )
    live = RunFolder(zhome_demo.runs_dir / "20260101-000000-dogs-0001")
    live.write_config({"output_name": "dogs", "dataset_path": "demo-shapes"})
    me = os.getpid()  # a live "worker", so the scheduler keeps the run running
    live.update_status(state="running", kind="train", user="bob", name="dogs", step=30, total_steps=120,
                       created=time.time(), pid=me, pid_start_time=process_start_time(me))  # fmt: skip
    live.append_metrics({"step": 30, "loss": 0.5, "eta": 95.0})
    (zhome_demo.loras_dir / "older.safetensors").write_bytes(b"x" * 2048)
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    assert not at.exception
    if not torch.cuda.is_available():
        assert any(i.value.startswith("CPU only") for i in at.info)
    assert [m.label for m in at.metric] == [
        "Disk: datasets",
        "Disk: models",
        "Disk: registry",
        "Disk: caches",
        "Disk: free",
    ]
    assert at.metric[0].value.endswith(("KB", "MB"))  # the demo dataset's images
    frames = [df.value for df in at.dataframe]
    q = next(f for f in frames if "position" in f.columns).set_index("run")
    assert q.loc[queued, "position"] == "1" and q.loc[queued, "state"] == "queued" and q.loc[queued, "user"] == "ann"
    assert q.loc[live.run_id, "state"] == "running"
    (bar,) = at.get("progress")
    assert bar.proto.text == "dogs (train, bob) · step 30 / 120 (25%) · running · ETA 1 min 35 s"
    loras = next(f for f in frames if "LoRA" in f.columns)
    assert list(loras["LoRA"]) == ["older"] and loras.iloc[0]["size"] == "2.0 KB"


def test_home_names_the_launcher_and_its_health(zhome, monkeypatch):
    import socket

    monkeypatch.setenv("ZIMAGE_GPUS", "none")
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    assert not at.exception
    line = f"Launcher: **local** · this host ({socket.gethostname()}): CPU only: one job at a time"
    assert line in [c.value for c in at.caption]
    zhome.settings_path.write_text('launcher = "ray"\n[ray]\n')  # no address, and none in the environment
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    assert not at.exception
    warnings = [w.value for w in at.warning]
    assert any(w.startswith("Launcher **ray** cannot be used now: ") for w in warnings), warnings
