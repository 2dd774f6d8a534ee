"""Turning a run folder's files into the values of its `runs` row (and its checkpoint rows).

The files come through zimage.run_records, so the values are already typed; a damaged status.json gives
state `damaged` with the reason in `problem` and only the fields that are valid on their own. The column
converters still check each value, so no value can fail an insert.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from zimage.records import Damaged
from zimage.run_records import read_progress

RUN_COLUMNS = (
    "run_id", "kind", "name", "user_name", "state", "dataset", "model", "output_name", "config", "status",
    "gpus", "gpu_ids", "host", "pid", "pid_start_time", "created", "started", "ended", "heartbeat",
    "last_heartbeat", "step", "total_steps", "queue_order", "cancelled", "resumes", "error", "output_path",
    "metrics_rows", "first_metric_step", "last_metric_step", "last_loss", "last_lr", "last_step_time", "eta",
    "malformed_lines", "samples_count", "last_sample_path", "checkpoints_count", "problem",
)  # fmt: skip


def to_int(v) -> int | None:
    try:
        i = None if v is None or isinstance(v, bool) else int(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return i if i is None or -(2**63) <= i < 2**63 else None  # a BIGINT column holds no more


def to_float(v) -> float | None:
    try:
        f = None if v is None or isinstance(v, bool) else float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return f if f is None or math.isfinite(f) else None


def to_str(v) -> str | None:
    return None if v is None else str(v)


def config_value(config: dict, key: str):
    """A flat config key, or the same key one level down in a nested section."""
    if key in config:
        return config[key]
    for section in config.values():
        if isinstance(section, dict) and key in section:
            return section[key]
    return None


_ID_TIME = re.compile(r"^(\d{8})-(\d{6})")


def run_time_of(run_id: str) -> int:
    """The timestamp at the start of a run id as a number (20261129225012), or 0 without one."""
    m = _ID_TIME.match(run_id)
    return int(m.group(1) + m.group(2)) if m else 0


def _last_valid(table: pa.Table, column: str):
    values = pc.drop_null(table.column(column))
    return values[-1].as_py() if len(values) else None


def apply_status(row: dict, s: dict) -> None:
    """The columns taken from status.json (the full file is kept too, as JSON)."""
    row.update(
        kind=to_str(s.get("kind")),
        name=to_str(s.get("name")),
        user_name=to_str(s.get("user")),
        state=to_str(s.get("state")),
        status=json.dumps(s, sort_keys=True, default=str),
        gpus=to_int(s.get("gpus")),
        gpu_ids=to_str(s.get("gpu_ids")),
        host=to_str(s.get("host")),
        pid=to_int(s.get("pid")),
        pid_start_time=to_float(s.get("pid_start_time")),
        created=to_float(s.get("created")) or to_float(s.get("started")),
        started=to_float(s.get("started")),
        ended=to_float(s.get("ended")),
        heartbeat=to_float(s.get("heartbeat")),
        last_heartbeat=to_float(s.get("last_heartbeat")),
        step=to_int(s.get("step")),
        total_steps=to_int(s.get("total_steps")),
        queue_order=to_float(s.get("queue_order")),
        cancelled=bool(s.get("cancelled")),
        resumes=to_int(s.get("resumes")) or 0,
        error=to_str(s.get("error")),
        output_path=to_str(s.get("output_path") or s.get("output")),
    )


def apply_config(row: dict, config: dict) -> None:
    """The columns taken from config.json (flat or sectioned): dataset folder name, model, output name."""
    dataset = config_value(config, "dataset_path") or config_value(config, "dataset")
    model = config_value(config, "model_path") or config_value(config, "model")
    row.update(
        config=json.dumps(config, sort_keys=True, default=str),
        dataset=Path(str(dataset)).name if dataset else None,
        model=to_str(model),
        output_name=to_str(config_value(config, "output_name")),
    )


def apply_metrics(row: dict, table: pa.Table | None) -> None:
    """Fold newly read metric rows into the run's summary (row count, first/last step, last values)."""
    if table is None or not table.num_rows:
        return
    row["metrics_rows"] = (row["metrics_rows"] or 0) + table.num_rows
    if row["first_metric_step"] is None:
        row["first_metric_step"] = table.column("step")[0].as_py()
    row["last_metric_step"] = table.column("step")[-1].as_py()
    for col, field in (("last_loss", "loss"), ("last_lr", "lr"), ("last_step_time", "step_time"), ("eta", "eta")):
        value = _last_valid(table, field)
        if value is not None:
            row[col] = value


def list_checkpoints(run_id: str, folder: Path) -> list[list]:
    """Entries of checkpoints/ (path relative to the run folder); the step is the last number in the name.

    Then the checkpoint's problem: its progress.json (written last, so its absence means the checkpoint is
    not whole) is missing, damaged or not marked complete; None for a sound one. Last, the val_loss its
    progress.json recorded (None when none was measured at its step)."""
    out = []
    if not folder.is_dir():
        return out
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):  # a checkpoint still being written
            continue
        digits = re.findall(r"\d+", entry.name)
        try:  # the trainer may prune an old checkpoint while we look
            st = entry.stat()
            size = st.st_size if entry.is_file() else sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        except FileNotFoundError:
            continue
        step = to_int(digits[-1]) if digits else None
        out.append([run_id, entry.name, step, f"checkpoints/{entry.name}", size, st.st_mtime, *_problem(entry)])
    return out


def _problem(entry: Path) -> tuple[str | None, float | None]:
    """(problem, val_loss) of a checkpoint entry, from its progress.json."""
    if not entry.is_dir():
        return None, None  # a single-file checkpoint of another layout: nothing to check
    progress = read_progress(entry / "progress.json")
    if isinstance(progress, Damaged):
        return progress.problem, None
    return (None if progress.complete else "progress.json: not marked complete"), progress.val_loss
