"""Experiment trackers for a training run: `report_to: [tensorboard, wandb, mlflow]` (the [trackers] extra).

Each name becomes accelerate's own tracker integration (accelerate.tracking.TensorBoardTracker,
WandBTracker, MLflowTracker): started once, the config stored once, every logged metrics line sent with
its step (the same records metrics.jsonl gets: `Job.add_metrics` hands them here), and sample images sent
where the tracker takes images (TensorBoard and W&B). They are called one by one instead of through
`Accelerator.log`, which stops at the first tracker that raises: here a missing package or a server that
does not answer becomes one warning in the run's log, that tracker is dropped, and training goes on.
Only the process that writes the run folder (rank 0) tracks.

Where the data goes:
    tensorboard  <run folder>/trackers/tensorboard/<run id>/events.out.tfevents.*  (`tensorboard --logdir`)
    wandb        the W&B project `zimage` (WANDB_PROJECT overrides it); WANDB_MODE=offline keeps it local
    mlflow       MLFLOW_TRACKING_URI when set, else a file store in <run folder>/trackers/mlruns
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zimage.config.schema import TRACKERS  # noqa: F401 - the names report_to takes

TAKES_IMAGES = ("tensorboard", "wandb")
PROJECT = "zimage"


def _build(name: str, run_name: str, folder: Path):
    from accelerate import tracking

    if name == "tensorboard":
        return tracking.TensorBoardTracker(run_name, folder / "tensorboard")
    if name == "wandb":
        import wandb  # noqa: F401 - fail here, with the package's name, when it is missing

        # accelerate passes its first argument to wandb.init as the project
        return tracking.WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), dir=str(folder), name=run_name)
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):  # a file store in the run folder (MLflow 3 asks to opt in)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
    return tracking.MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT), run_name=run_name)


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as trackers store hyperparameters: bool / int / float / str values only."""
    out = {}
    for key, value in config.items():
        if value is None or isinstance(value, bool | int | float | str):
            out[key] = "" if value is None else value
        else:
            out[key] = ", ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return out


class RunTrackers:
    """The trackers of one run; each call is safe: a failing tracker is logged once and dropped."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log
        self.active: dict[str, Any] = {}

    @classmethod
    def start(cls, names: list[str], run_dir: Path | None, run_name: str, config: dict[str, Any],
              log: Callable[[str], None] = print) -> RunTrackers:  # fmt: skip
        """Start the trackers `names` for the run in `run_dir` and store `config` once."""
        from zimage.training.distributed import is_main_rank

        self = cls(log)
        if not names or not is_main_rank():
            return self
        folder = Path(run_dir) / "trackers" if run_dir is not None else Path.cwd() / "trackers"
        for name in names:
            try:
                tracker = _build(name, run_name, folder)
                tracker.start()
                tracker.store_init_configuration(flat_config(config))
            except ImportError as exc:
                log(f"Warning: tracker {name} is not installed ({exc.name or exc}); `pip install "
                    f"zimage-lora-studio[trackers]` adds it. Training goes on without it.")  # fmt: skip
                continue
            except Exception as exc:  # a server that does not answer, a bad login: the run matters more
                log(
                    f"Warning: tracker {name} could not start ({type(exc).__name__}: {exc}); training goes on without it."
                )
                continue
            self.active[name] = tracker
            log(f"Tracking with {name}" + (f" in {folder / name}" if name == "tensorboard" else ""))
        return self

    def _call(self, name: str, what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:
            self.log(f"Warning: tracker {name} failed to {what} ({type(exc).__name__}: {exc}); it is dropped.")
            self.active.pop(name, None)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """One metrics line (`step` and numbers): every finite number is sent at its step."""
        step = record.get("step")
        values = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)
                  and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip
        if not values or not isinstance(step, int):
            return
        for name, tracker in list(self.active.items()):
            self._call(name, "log metrics", lambda t=tracker: t.log(values, step=step))

    def log_samples(self, records: list[dict[str, Any]], run_dir: Path | None) -> None:
        """Sample images (samples.jsonl records, paths relative to `run_dir`) to the trackers that take them."""
        if not records or run_dir is None or not any(n in self.active for n in TAKES_IMAGES):
            return
        import numpy as np
        from PIL import Image

        step = int(records[0]["step"])
        for name in TAKES_IMAGES:
            tracker = self.active.get(name)
            if tracker is None:
                continue
            for r in records:
                key = f"samples/{int(r.get('index', 0))}"
                with Image.open(Path(run_dir) / r["path"]) as im:
                    array = np.asarray(im.convert("RGB"))
                if name == "tensorboard":
                    self._call(name, "log images", lambda t=tracker, k=key, a=array: t.log_images(
                        {k: a[None]}, step=step, dataformats="NHWC"))  # fmt: skip
                else:
                    self._call(name, "log images", lambda t=tracker, k=key, a=array: t.log_images({k: [a]}, step=step))

    def finish(self) -> None:
        for name, tracker in list(self.active.items()):
            self._call(name, "finish", tracker.finish)
        self.active.clear()


def attach(report, config, run_dir: Path | None) -> RunTrackers:
    """Start `config.report_to` (a TrainingConfig) for the trainer's reporter (a zimage.job.Job): every
    metrics line it gets goes to the trackers too, and they finish when the job ends."""
    run_name = Path(run_dir).name if run_dir is not None else "run"
    trackers = RunTrackers.start(list(config.report_to), run_dir, run_name, config.to_dict(), log=report.log)
    if trackers.active:
        report.metric_listeners.append(trackers.log_metrics)
        report.at_end(trackers.finish)
    return trackers
