"""The run folder's files as the studio reads them back: one schema and one reader per file kind.

DESIGN.md section 7: files read back from disk are input too. Every file of a run folder that another
process wrote is read here, through zimage.records, and comes back as a validated object or as a
`Damaged` naming the file, the field and what was wrong; nothing else parses these files.

    file                               schema           reader
    status.json                        StatusRecord     read_status(path)
    control.json                       ControlFile      read_control(path) -> ControlRead (each request
                                       ControlRequest       checked on its own: one bad request is skipped)
    config.json (as a run-folder file) ConfigRecord     read_config(path)  (the training fields themselves
                                                            are zimage.config's to validate)
    launch.json                        LaunchRecord     read_launch(path)
    checkpoints/step-*/progress.json   ProgressRecord   read_progress(path)
    metrics.jsonl, one line            MetricsLine      parse_metrics_line(raw, name)
    samples.jsonl, one line            SampleLine       parse_sample_line(raw, name)

Types are strict: a string where a number belongs, a float where a whole number belongs, NaN or a number
too large for its column is a problem, never a crash later (in `int(pid)`, in DuckDB, in a page).
Unknown keys are kept (a newer version may add some), except on metrics lines, where they are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field

from zimage.records import Damaged, Record, parse_record, read_record, validate_record

STATES = ("queued", "starting", "running", "paused", "stopping", "completed", "stopped", "failed", "lost")
FINAL_STATES = ("completed", "stopped", "failed", "lost")
ACTIVE_STATES = ("starting", "running", "paused", "stopping")
DAMAGED = "damaged"  # what the registry, the CLI and the pages call a run whose status.json cannot be read
CONTROL_ACTIONS = ("stop", "pause", "resume", "save_now", "sample_now")
METRIC_FIELDS = (
    "step", "loss", "lr", "grad_norm", "step_time", "samples_per_s", "mem_allocated", "mem_peak", "elapsed", "eta",
    "val_loss",
)  # fmt: skip
# A line with val_loss also holds one val_loss_<sigma> per validation sigma (zimage.training.validation).

INT64 = 2**63  # DuckDB's BIGINT: a step outside it cannot be stored
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # an int is accepted (5 -> 5.0)
Count = Annotated[int, Field(strict=True, ge=0, lt=INT64)]
Int64 = Annotated[int, Field(strict=True, ge=-INT64, lt=INT64)]
Pid = Annotated[int, Field(strict=True, ge=0, lt=2**31)]  # psutil refuses larger ones with OverflowError
# A line's step may be written as 6.0 by a writer whose numbers are all doubles; 6.5 or "6" is no step.
LineStep = Annotated[Int64, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]
Text = Annotated[str, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]


class StatusRecord(Record):
    """status.json: the fields the studio reads (DESIGN.md section 2); kinds add their own (phase, loss...)."""

    state: Literal[STATES] | None = None
    kind: Text | None = None
    name: Text | None = None
    user: Text | None = None
    host: Text | None = None
    step: Count | None = None
    total_steps: Count | None = None
    pid: Pid | None = None
    pid_start_time: Finite | None = None
    cuda_visible_devices: Text | None = None
    gpu_ids: Text | None = None
    gpus: Annotated[int, Field(strict=True, ge=1, le=4096)] | None = None
    created: Finite | None = None
    launched: Finite | None = None
    started: Finite | None = None
    ended: Finite | None = None
    heartbeat: Finite | None = None
    last_heartbeat: Finite | None = None
    queue_order: Finite | None = None
    error: Text | None = None
    traceback: Text | None = None
    output_path: Text | None = None
    cancelled: Flag | None = None
    resume: Flag | None = None
    resumes: Annotated[int, Field(strict=True, ge=0, lt=2**31)] | None = None  # an INTEGER column
    control_done: list[Text] = []


class ControlRequest(Record):
    """One request in control.json, as the app and the CLI write it (zimage.runfolder.send_control)."""

    id: Annotated[str, Field(strict=True, min_length=1, max_length=200)]
    action: Literal[CONTROL_ACTIONS]
    at: Finite = 0.0  # absent is fine (a hand-written request); null, text or a huge number is not
    user: Text | None = None


class ControlFile(Record):
    """control.json: {"requests": [...]}; each request is checked on its own (ControlRequest)."""

    requests: Annotated[list[Any], Field(strict=True)] = []


class ConfigRecord(Record):
    """config.json as a run-folder file: a JSON object. Its fields are the job kind's to validate."""


class LaunchRecord(Record):
    """launch.json: the launcher's record of the worker process it started."""

    pid: Pid | None = None
    pid_start_time: Finite | None = None
    launched: Finite | None = None
    gpu_ids: Text | None = None
    cmd: list[Text] = []


class ProgressRecord(Record):
    """checkpoints/step-NNNNNN/progress.json, written last into a checkpoint; `complete` says it is whole."""

    step: Count
    complete: Flag = False
    saved: Finite | None = None
    epoch: Count | None = None
    position: Count | None = None
    reason: Text | None = None
    training_type: Text | None = None
    val_loss: Finite | None = None  # the validation loss measured at this checkpoint's step


class MetricsLine(Record):
    """One metrics.jsonl line: an integer step and the DESIGN.md metric fields (numbers or null)."""

    model_config = ConfigDict(extra="ignore")  # unknown keys are ignored (the registry has no place for them)

    step: LineStep
    loss: Finite | None = None
    lr: Finite | None = None
    grad_norm: Finite | None = None
    step_time: Finite | None = None
    samples_per_s: Finite | None = None
    mem_allocated: Finite | None = None
    mem_peak: Finite | None = None
    elapsed: Finite | None = None
    eta: Finite | None = None
    val_loss: Finite | None = None


class SampleLine(Record):
    """One samples.jsonl line: step, path (relative to the run folder), prompt and seed; the rest is kept."""

    step: LineStep
    path: Text
    prompt: Text | None = None
    seed: Int64 | None = None


# -- readers -------------------------------------------------------------------------------------------
def read_status(path: Path | str, missing: Any = None) -> StatusRecord | Damaged | Any:
    """status.json; a missing file gives `missing` (a folder still being created has none yet)."""
    return read_record(path, StatusRecord, missing=missing)


def read_config(path: Path | str, missing: Any = None) -> ConfigRecord | Damaged | Any:
    return read_record(path, ConfigRecord, missing=missing)


def read_launch(path: Path | str) -> LaunchRecord | Damaged | None:
    return read_record(path, LaunchRecord, missing=None)


def read_progress(path: Path | str) -> ProgressRecord | Damaged:
    """A checkpoint's progress.json; missing is a problem too (the checkpoint is not whole without it)."""
    return read_record(path, ProgressRecord)


def parse_metrics_line(raw: bytes | str, name: str = "metrics.jsonl line") -> MetricsLine | Damaged:
    return parse_record(raw, MetricsLine, name)


def parse_sample_line(raw: bytes | str, name: str = "samples.jsonl line") -> SampleLine | Damaged:
    return parse_record(raw, SampleLine, name)


@dataclass
class ControlRead:
    """What control.json holds: the well-formed requests, oldest first, and one problem per bad one.

    `problems` pairs a stable key (the bad entry's own JSON, or the file's problem) with the line to log,
    so a worker that polls every step can say each thing once."""

    requests: list[ControlRequest] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def read_control(path: Path | str) -> ControlRead:
    """control.json; a missing file holds no requests and no problems. A number too large for a double
    spoils only the request it is in (it is read as infinity here, then refused there)."""
    rec = read_record(path, ControlFile, missing=None, finite=False)
    if rec is None:
        return ControlRead()
    if isinstance(rec, Damaged):
        return ControlRead(problems=[(rec.problem, rec.problem)])
    out = ControlRead()
    for i, entry in enumerate(rec.requests):
        name = f"{Path(path).name}: request {i + 1}"
        req = validate_record(name, entry, ControlRequest)
        key, finite = _key(entry)
        if not isinstance(req, str) and not finite:  # an infinity outside the declared fields
            req = f"{name}: holds a number too large for JSON"
        if isinstance(req, str):
            out.problems.append((key, req))
        else:
            out.requests.append(req)
    return out


def _key(entry: Any) -> tuple[str, bool]:
    """(the entry's own JSON, a stable key for "said once"; whether it is free of infinities)."""
    try:
        return json.dumps(entry, sort_keys=True, allow_nan=False), True
    except ValueError:
        return json.dumps(entry, sort_keys=True), False
    except RecursionError:  # nested about as deep as the parser allows
        return f"nested {type(entry).__name__} {len(entry)}", True


def salvage_status(data: Any) -> dict[str, Any]:
    """The fields of a damaged status.json that are valid on their own (kind, user, name...), so a damaged
    run can still be listed under its kind and owner; nothing of a file that is not an object."""
    if not isinstance(data, dict):
        return {}
    out = {}
    for key in StatusRecord.model_fields:
        if key in data:
            rec = validate_record("status.json", {key: data[key]}, StatusRecord)
            if isinstance(rec, StatusRecord):
                out[key] = getattr(rec, key)
    return out


def status_fields(rec: StatusRecord) -> dict[str, Any]:
    """A valid status as a plain dict: the keys the file held (typed), unknown keys included."""
    return rec.model_dump(exclude_unset=True)
