"""The Home page: the machine (GPUs or CPU only, disk), the queue, active runs, recent LoRAs."""

from __future__ import annotations

import pandas as pd

from zimage.settings import Settings
from zimage.system import GpuInfo, GpuReport, human_bytes
from zimage.views.format import clock, duration, fraction, progress_text, silence


def gpu_rows(gpus: list[GpuInfo], active: pd.DataFrame | None = None) -> list[dict]:
    """One row per GPU: name, memory in use, utilisation, and which job holds it (the active runs' gpu_ids,
    list_runs rows); processes on it that are not one of those jobs are counted as others."""
    holders: dict[int, list[str]] = {g.index: [] for g in gpus}
    for r in active.itertuples(index=False) if active is not None and not active.empty else []:
        name, user = _text(r.name) or r.run_id, _text(r.user) or "?"
        for gid in _text(r.gpu_ids).split(","):
            for g in gpus:
                if gid.strip() and g.matches(gid):
                    holders[g.index].append(f"{name} ({r.kind}, {user})")
    return [
        {
            "GPU": g.index,
            "name": g.name,
            "job": ", ".join(holders[g.index]) or "free",
            "memory in use": f"{human_bytes(g.used_bytes)} of {human_bytes(g.total_bytes)}",
            "memory %": round(100 * g.used_bytes / g.total_bytes, 1) if g.total_bytes else 0.0,
            "utilisation %": g.utilization,
            "processes": len(g.pids),
        }
        for g in gpus
    ]


def _text(value) -> str:
    """A DataFrame cell as text: '' for None / NaN."""
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)


def no_gpu_text(report: GpuReport) -> str:
    """What Home says when it lists no GPU, with the reason (no NVIDIA driver, NVML missing, ...)."""
    return (
        f"CPU only: {report.problem or 'no NVIDIA GPU found'}. Training runs on the CPU (fine for the tiny demo model)."
    )


def disk_rows(usage: dict[str, int]) -> list[tuple[str, str]]:
    """(label, size) for datasets, models, registry, caches and the free space."""
    labels = {"datasets": "Datasets", "models": "Models", "registry": "Registry", "cache": "Caches", "free": "Free"}
    return [(labels.get(k, k), human_bytes(v)) for k, v in usage.items()]


def recent_loras(settings: Settings, limit: int = 10) -> list[dict]:
    """Trained LoRA files, newest first: name, size, saved."""
    folder = settings.loras_dir
    files = [p for p in folder.glob("*.safetensors") if not p.name.startswith(".")] if folder.is_dir() else []
    files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [
        {"LoRA": p.stem, "size": human_bytes(p.stat().st_size), "saved": clock(p.stat().st_mtime), "path": str(p)}
        for p in files[:limit]
    ]


def queue_rows(df: pd.DataFrame, launcher: str = "local") -> list[dict]:
    """registry.queue rows: position (queued only), run, kind, user, state, priority, where it runs (the
    backend, with its job id; `launcher` for a queued job that names none), and why a queued job waits
    ("waiting for a GPU", "user limit 2 reached", "behind 3 jobs"; the scheduler's words)."""
    return [
        {
            "position": "" if pd.isna(r.position) else str(int(r.position)),  # text: running jobs have none
            "run": r.run_id,
            "kind": r.kind,
            "name": r.name,
            "user": r.user,
            "state": r.state,
            "priority": _text(getattr(r, "priority", None)) or "normal",
            "on": _where(r, launcher),
            "waiting": _text(getattr(r, "waiting", None)) if r.state == "queued" else "",
        }
        for r in df.itertuples(index=False)
    ]


def _where(r, launcher: str) -> str:
    backend = _text(getattr(r, "backend", None)) or (launcher if r.state == "queued" else "local")
    job = _text(getattr(r, "backend_job_id", None))
    return f"{backend} (job {job})" if job and backend != "local" and r.state != "queued" else backend


def launcher_line(name: str, health, also: bool = False) -> tuple[bool, str]:
    """(ok, text) for a launcher line above the queue: the backend and its health, with the error. `also`:
    another launcher than the home's, which some job in the queue names."""
    label = "Also in use" if also else "Launcher"
    if health.ok:
        return True, f"{label}: **{name}** · {health.summary}"
    return False, f"{label} **{name}** cannot be used now: {health.summary}. Queued jobs for it wait."


def other_launchers(rows: list[dict], launcher: str) -> list[str]:
    """The cluster launchers other than the home's that the queue's jobs run on or wait for (queue_rows)."""
    names = {str(r["on"]).split(" ", 1)[0] for r in rows}
    return sorted(n for n in names if n not in ("local", launcher))


def active_progress(df: pd.DataFrame) -> list[tuple[str, float, str]]:
    """(run id, fraction, text) for each running run's progress bar (from list_runs rows)."""
    out = []
    for r in df.itertuples(index=False):
        name = r.name or r.output_name or r.run_id
        text = f"{name} ({r.kind}, {r.user}) · " + progress_text(r.step, r.total_steps, r.eta, r.state)
        quiet = silence(r.state, getattr(r, "heartbeat", None))
        if quiet is not None:
            text += f" · ⚠ silent {duration(quiet)}"
        out.append((r.run_id, fraction(r.step, r.total_steps), text))
    return out
