"""Runs read straight from their folders, for the CLI: it must work while the app owns the database,
and the folders are the truth anyway. The pages use the registry queries instead (fast at scale).

Every file goes through zimage.run_records: a run whose status.json is damaged is listed in state
`damaged` with its `problem` (config.json's problem is reported the same way), never skipped silently and
never fatal to the listing.
"""

from __future__ import annotations

import os
from pathlib import Path

from zimage.jobs.queue import queued_runs, run_dirs, run_folder
from zimage.records import Damaged
from zimage.registry.rows import config_value
from zimage.run_records import (
    ACTIVE_STATES,
    DAMAGED,
    MetricsLine,
    parse_metrics_line,
    read_config,
    read_status,
    salvage_status,
    status_fields,
)
from zimage.settings import Settings


def tail_lines(path: Path, count: int = 1, block: int = 65536) -> list[dict]:
    """The last `count` valid metrics lines of a file (reads only its end), as dicts of their fields."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - block))
            data = fh.read()
    except OSError:
        return []
    out = []
    for line in reversed(data.split(b"\n")):
        if not line.strip():
            continue
        rec = parse_metrics_line(line)  # blank, cut in half by the block start, or malformed: skipped
        if isinstance(rec, MetricsLine):
            out.append(rec.model_dump())
            if len(out) == count:
                break
    return out[::-1]


def summarize(path: Path) -> dict:
    """One run's status, config, last metrics line and sample/checkpoint counts; `problem` says what is
    damaged (state `damaged` when it is status.json), None when nothing is."""
    rec = read_status(path / "status.json", missing={})
    config_rec = read_config(path / "config.json", missing={})
    problems = [r.problem for r in (rec, config_rec) if isinstance(r, Damaged)]
    if isinstance(rec, Damaged):
        status = {**salvage_status(rec.data), "state": DAMAGED}
    else:
        status = status_fields(rec) if rec else {}
    config = config_rec.model_dump() if config_rec and not isinstance(config_rec, Damaged) else {}
    last = tail_lines(path / "metrics.jsonl")
    dataset = config_value(config, "dataset_path") or config_value(config, "dataset")
    ckpt = path / "checkpoints"
    samples = path / "samples.jsonl"
    return {
        "run_id": path.name,
        "run_dir": str(path),
        "state": status.get("state"),
        "kind": status.get("kind"),
        "name": status.get("name"),
        "user": status.get("user"),
        "dataset": Path(str(dataset)).name if dataset else None,
        "step": status.get("step"),
        "total_steps": status.get("total_steps"),
        "last_loss": last[0].get("loss") if last else None,
        "eta": last[0].get("eta") if last else None,
        "created": status.get("created") or status.get("started"),
        "problem": "; ".join(problems) or None,
        "status": status,
        "config": config,
        "last_metrics": last[0] if last else None,
        "samples": _count_lines(samples),
        "checkpoints": _entries(ckpt),
    }


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for ln in path.read_bytes().splitlines() if ln.strip())
    except OSError:  # none yet, or a folder where the file belongs
        return 0


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []


def show_run(settings: Settings, run_id: str) -> dict:
    return summarize(run_folder(settings, run_id).path)


def scan_runs(
    settings: Settings,
    state: str | None = None,
    user: str | None = None,
    dataset: str | None = None,
    kind: str | None = None,
    text: str | None = None,
) -> list[dict]:
    """Runs newest first, filtered like the Runs page."""
    out = []
    for path in run_dirs(settings):
        if not os.path.lexists(path / "status.json"):  # a folder still being created
            continue
        info = summarize(path)
        if state and info["state"] != state:
            continue
        if user and info["user"] != user:
            continue
        if dataset and info["dataset"] != dataset:
            continue
        if kind and info["kind"] != kind:
            continue
        if text:
            hay = " ".join(str(info.get(k) or "") for k in ("run_id", "name", "user", "dataset", "kind"))
            hay += " " + str(config_value(info["config"], "output_name") or "")
            if text.lower() not in hay.lower():
                continue
        out.append(info)
    out.sort(key=lambda r: (r["created"] or 0.0, r["run_id"]), reverse=True)
    return out


def queue_view(settings: Settings) -> tuple[list[tuple[str, dict]], list[dict]]:
    """(queued jobs in start order, runs active now)."""
    active = []
    for path in run_dirs(settings):
        rec = read_status(path / "status.json")
        if rec is not None and not isinstance(rec, Damaged) and rec.state in ACTIVE_STATES:
            active.append(summarize(path))
    return queued_runs(settings), active


def damaged_runs(settings: Settings) -> list[dict]:
    """Runs with a damaged status.json or config.json, in id order: run_id, state, problem."""
    out = []
    for path in run_dirs(settings):
        if not os.path.lexists(path / "status.json"):
            continue
        status, config = read_status(path / "status.json"), read_config(path / "config.json")
        problems = [r.problem for r in (status, config) if isinstance(r, Damaged)]
        if problems:
            state = DAMAGED if isinstance(status, Damaged) else (status.state if status else None)
            out.append({"run_id": path.name, "state": state, "problem": "; ".join(problems)})
    return out
