"""Launching from the Train page: checks, the queue, the position in line, the next free output name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from zimage import jobs
from zimage.errors import UserError
from zimage.jobs.queue import PRIORITIES, queued_runs  # noqa: F401 - PRIORITIES: for the Train page
from zimage.jobs.scheduler import refresh_run
from zimage.runfolder import ACTIVE_STATES
from zimage.settings import Settings
from zimage.views import train_form as tf


class NotLaunched(UserError):
    """The form cannot be launched as it is; the message says what to fix."""


def busy_outputs(runs: pd.DataFrame) -> dict[str, str]:
    """output_name -> run id of the training runs that are waiting or running (list_runs rows)."""
    if runs.empty:
        return {}
    live = runs[runs["state"].isin(["queued", *ACTIVE_STATES])]
    return {name: run_id for name, run_id in zip(live["output_name"], live["run_id"], strict=True) if name}


def queue_position(settings: Settings, run_id: str) -> int | None:
    """1-based place in the queue (1 starts next); None once the job has left the queue."""
    for i, (rid, _status) in enumerate(queued_runs(settings), 1):
        if rid == run_id:
            return i
    return None


def launch_run(
    settings: Settings,
    values: Mapping[str, Any],
    user: str | None,
    busy: Mapping[str, str],
    actor=None,
    gpus: int = 1,
    priority: str | None = None,
    backend: str | None = None,
) -> tuple[str, int | None, str]:
    """Check the form and queue the run: (run id, queue position, a free output name for the next run).
    `gpus` > 1 trains data parallel, one torchrun rank per GPU (gpus_offered says how many this host has);
    `priority` is high, normal or low (None: the home's default); `backend` is where it runs (None, or the
    home's launcher: it follows the home's launcher)."""
    problems, _resolved = tf.check(values, settings, busy)
    if problems:
        n = sum(len(v) for v in problems.values())
        raise NotLaunched(f"Not launched: {n} setting(s) need attention (marked next to the fields).")
    if not user:
        raise NotLaunched("Your name: type it in the sidebar first, so the team knows whose run this is.")
    config = tf.config_from_values(values)
    run_id = jobs.enqueue(settings, "train", config.to_dict(), user=user, name=config.output_name, actor=actor,
                          gpus=gpus, priority=priority, backend=backend if backend != launcher_of(settings) else None)  # fmt: skip
    refresh_run(settings, run_id)  # the registry (Runs page, busy names) knows it at once
    following = tf.free_output_name(settings, config.output_name, taken=[*busy, config.output_name])
    return run_id, queue_position(settings, run_id), following


def gpus_offered(settings: Settings) -> int:
    """How many GPUs one training job may use on this host: its scheduler's GPU slots (NVML, settings.toml or
    ZIMAGE_GPUS; no CUDA context), at least 1. The Train page offers a GPU count only when this is over 1."""
    from zimage.jobs.slots import slot_config

    try:
        return max(1, len(slot_config(home=settings.home_settings().scheduler).gpu_ids))
    except UserError:  # a bad ZIMAGE_GPUS / settings.toml: the scheduler reports it; one GPU here
        return 1


def launcher_of(settings: Settings) -> str:
    """The home's launcher (settings.toml `launcher`); local when the file is bad (the scheduler reports it)."""
    try:
        return settings.home_settings().launcher
    except UserError:
        return "local"


def backends_offered(settings: Settings) -> list[str]:
    """Where the Train page lets a run go: local, and each cluster launcher whose extra is installed and that
    the home uses or configures (its settings.toml section). The home's launcher comes first."""
    from zimage.jobs.backends import BACKENDS, check_backend

    try:
        home = settings.home_settings()
    except UserError:
        return ["local"]
    offered = []
    for name in BACKENDS:
        configured = name == "local" or name == home.launcher or bool(getattr(home, name).model_fields_set)
        try:
            if configured and check_backend(name):
                offered.append(name)
        except UserError:
            continue
    return sorted(offered, key=lambda n: n != home.launcher)


def default_priority(settings: Settings) -> str:
    """The priority the Train page preselects: settings.toml's `[scheduler] default_priority`."""
    try:
        return settings.home_settings().scheduler.default_priority
    except UserError:  # a bad settings.toml: the scheduler reports it; enqueue refuses with the reason
        return "normal"


def position_text(run_id: str, position: int | None) -> str:
    if position is None:
        return f"Run {run_id} has started."
    return f"Queued run {run_id}: position {position} in the queue" + (" (starts next)." if position == 1 else ".")
