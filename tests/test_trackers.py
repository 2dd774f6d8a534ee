"""report_to: a real tiny run logs to TensorBoard (read back with tensorboard's EventAccumulator: its loss
scalars are metrics.jsonl's, its images the samples) and to MLflow's local file store; a tracker that is
not installed (or will not start) is a warning in the run's log and training goes on. No network."""

from __future__ import annotations

import importlib.util
import json

import pytest
from shared_cache import home_with_shared_cache
from train_support import fast_config, one_thread_per_module  # noqa: F401 - autouse

from zimage.config import build_config, validate_config
from zimage.errors import UserError
from zimage.runfolder import RunFolder
from zimage.training.runner import run_training

HAS_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return home_with_shared_cache(tmp_path_factory, tiny_model_dir, "trackers")


@pytest.fixture(scope="module")
def tracked_run(home, tmp_path_factory):
    pytest.importorskip("tensorboard")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")  # never the network
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    trackers = ["tensorboard", "wandb"] + (["mlflow"] if importlib.util.find_spec("mlflow") else [])
    config = fast_config(num_steps=5, report_to=trackers, sample_every_n_steps=5, sample_prompts=["a [trigger]"],
                         output_name="tracked")  # fmt: skip
    resolved = validate_config(build_config(config), home)
    run = RunFolder(tmp_path_factory.mktemp("tracked") / "run-tracked")
    run.write_config(resolved.config.to_dict())
    code = run_training(resolved, home, run.path)
    mp.undo()
    assert code == 0, run.read_status().get("traceback")
    return run, trackers


def test_report_to_names_are_checked(home):
    with pytest.raises(UserError, match="report_to"):
        validate_config(build_config(fast_config(report_to=["tensorbored"])), home)


@pytest.mark.slow  # one real tiny run with three trackers (~25 s with W&B's start)
def test_tensorboard_loss_scalars_equal_metrics_jsonl(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = tracked_run
    folder = run.path / "trackers" / "tensorboard" / run.path.name
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    metrics = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    want = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert len(want) == 5 and [s for s, _ in got] == [s for s, _ in want]
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # TensorBoard keeps float32
    assert [e.step for e in acc.Scalars("lr")] == [m["step"] for m in metrics if m.get("lr") is not None]
    images = acc.Tags()["images"]
    assert images == ["samples/0"]
    assert sorted({e.step for e in acc.Images("samples/0")}) == [0, 5]  # the baseline and the end
    assert "Tracking with tensorboard" in run.log_path.read_text()


@pytest.mark.slow  # one real tiny run with three trackers (~25 s with W&B's start)
def test_a_missing_tracker_is_a_warning_and_training_goes_on(tracked_run):
    run, _ = tracked_run
    log = run.log_path.read_text()
    assert run.read_status()["state"] == "completed"
    if HAS_WANDB:
        assert "Tracking with wandb" in log and list((run.path / "trackers" / "wandb").glob("offline-run-*"))
    else:
        assert "Warning: tracker wandb is not installed" in log and "[trackers]" in log


@pytest.mark.slow  # one real tiny run with three trackers (~25 s with W&B's start)
def test_mlflow_local_file_store_has_the_params_and_losses(tracked_run, monkeypatch):
    run, trackers = tracked_run
    if "mlflow" not in trackers:
        pytest.skip("mlflow-skinny is not installed (the [trackers] extra)")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: file stores are opt-in

    client = MlflowClient(tracking_uri=(run.path / "trackers" / "mlruns").resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "zimage"]
    (found,) = client.search_runs([exp.experiment_id])
    assert found.data.params["num_steps"] == "5" and found.data.params["report_to"].startswith("tensorboard")
    history = client.get_metric_history(found.info.run_id, "loss")
    metrics = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [h.step for h in history] == [m["step"] for m in metrics]
    assert [h.value for h in history] == pytest.approx([m["loss"] for m in metrics], rel=1e-9)
