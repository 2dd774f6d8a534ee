"""Runs read straight from their folders, for the CLI: it must work while the app owns the database,
and the folders are the truth anyway. The pages use the registry queries instead (fast at scale)."""

from __future__ import annotations

import json
from pathlib import Path

from zimage.fsio import read_json
from zimage.jobs.queue import queued_runs, run_dirs, run_folder
from zimage.registry.rows import config_value
from zimage.runfolder import ACTIVE_STATES
from zimage.settings import Settings


def tail_lines(path: Path, count: int = 1, block: int = 65536) -> list[dict]:
    """The last `count` parseable JSON lines of a file (reads only its end)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - block))
            data = fh.read()
    except FileNotFoundError:
        return []
    out = []
    for line in reversed(data.split(b"\n")):
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # blank, cut in half by the block start, or malformed
        if isinstance(obj, dict):
            out.append(obj)
            if len(out) == count:
                break
    return out[::-1]


def summarize(path: Path) -> dict:
    """One run's status, config, last metrics line and sample/checkpoint counts."""
    status = read_json(path / "status.json", {}) or {}
    config = read_json(path / "config.json", {}) or {}
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
        "status": status,
        "config": config,
        "last_metrics": last[0] if last else None,
        "samples": sum(1 for ln in samples.read_bytes().splitlines() if ln.strip()) if samples.exists() else 0,
        "checkpoints": sorted(p.name for p in ckpt.iterdir() if not p.name.startswith(".")) if ckpt.is_dir() else [],
    }


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
        if not (path / "status.json").exists():
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
    out.sort(key=lambda r: (float(r["created"] or 0), r["run_id"]), reverse=True)
    return out


def queue_view(settings: Settings) -> tuple[list[tuple[str, dict]], list[dict]]:
    """(queued jobs in start order, runs active now)."""
    active = [
        summarize(p)
        for p in run_dirs(settings)
        if (read_json(p / "status.json", {}) or {}).get("state") in ACTIVE_STATES
    ]
    return queued_runs(settings), active
