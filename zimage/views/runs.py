"""The Runs page: the table of runs, one run's charts, the actions its state allows, log tail, samples."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pandas as pd

from zimage.runfolder import ACTIVE_STATES, FINAL_STATES
from zimage.settings import Settings
from zimage.views import charts
from zimage.views.format import clock, duration, fraction, number, progress_text, silence, state_text

LIVE_STATES = ("queued", *ACTIVE_STATES)
RUN_METRICS = ("loss", "lr", "step_time", "mem_allocated", "mem_peak", "val_loss")
TABLE_REFRESH_S = 2  # the Runs table redraws itself this often (one registry query each time)
ACTIONS = {"stop": "Stop", "pause": "Pause", "resume": "Resume", "save_now": "Save now", "sample_now": "Sample now"}
TABLE_COLUMNS = ["run", "name", "state", "user", "dataset", "progress", "steps", "last loss", "ETA", "started"]
THUMB_SIZE = 256


def runs_table(df: pd.DataFrame, now: float | None = None) -> pd.DataFrame:
    """`list_runs` rows as the page shows them: progress in percent, ETA and start time as text."""
    if df.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    rows = []
    for r in df.itertuples(index=False):
        live = r.state in ("running", "starting")
        total = "" if pd.isna(r.total_steps) else f" / {int(r.total_steps)}"
        rows.append(
            {
                "run": r.run_id,
                "name": r.name or r.output_name or "",
                "state": state_text(r.state, r.heartbeat, now),
                "user": r.user or "",
                "dataset": r.dataset or "",
                "progress": 0.0 if pd.isna(r.progress) else round(float(r.progress) * 100, 1),
                "steps": f"{0 if pd.isna(r.step) else int(r.step)}{total}",
                "last loss": number(r.last_loss),
                "ETA": duration(r.eta) if live else "",
                "started": clock(r.started if not pd.isna(r.started) else r.created, now),
            }
        )
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def run_label(row: Any) -> str:
    """A run in a picker or legend: 'name · created'. No state in it: a label must not change while the run
    goes from queued to completed (Streamlit keeps a picked option by its label)."""
    name = row.get("name") or row.get("output_name") or row.get("run_id")
    created = row.get("created")
    created = created if created is not None and not pd.isna(created) else row.get("started")
    return f"{name} · {clock(created)}" if clock(created) else str(name)


def action_states(state: str | None) -> dict[str, bool]:
    """Which of Stop / Pause / Resume / Save now / Sample now a run in `state` accepts (zimage.jobs.control)."""
    on = set()
    if state == "queued":
        on = {"stop"}  # cancels it
    elif state in ("starting", "running"):
        on = {"stop", "pause", "save_now", "sample_now"}
    elif state == "paused":
        on = {"stop", "resume", "save_now", "sample_now"}
    elif state in ("stopped", "failed", "lost"):
        on = {"resume"}  # back in line; continues from its last checkpoint
    return {action: action in on for action in ACTIONS}


def silence_warning(detail: dict, now: float | None = None) -> str | None:
    """What to tell people about a live run whose worker has gone quiet (see format.silence), or None."""
    quiet = silence(detail.get("state"), detail.get("heartbeat"), now)
    if quiet is None:
        return None
    return (
        f"No heartbeat from this run's worker for {duration(quiet)}. A worker that is still running but silent "
        "may be stuck (a hung disk or GPU, a deadlock): wait a little, or Stop it and resume it later from its "
        "last checkpoint."
    )


def progress_line(detail: dict) -> tuple[float, str]:
    """(fraction, text) for the run's progress bar."""
    status = detail.get("status") or {}
    step = detail.get("step") if detail.get("step") is not None else status.get("step")
    total = detail.get("total_steps") if detail.get("total_steps") is not None else status.get("total_steps")
    eta = detail.get("eta")
    return fraction(step, total), progress_text(step, total, eta, detail.get("state"))


def is_final(state: str | None) -> bool:
    return state in FINAL_STATES


def run_charts(series: pd.DataFrame, smoothing: float, log_y: bool) -> dict[str, Any]:
    """Altair charts of one run: loss (smoothed, optional log axis), learning rate, step time, memory."""
    out = {}
    loss = charts.series_frame(series, "loss", smoothing, labels=_all_as(series, "loss"))
    out["Loss"] = charts.metric_chart(loss, "loss", log_y=log_y, smoothed=smoothing > 0) if not loss.empty else None
    for metric, title in (("lr", "Learning rate"), ("step_time", "Step time (s)")):
        frame = charts.series_frame(series, metric, labels=_all_as(series, metric))
        out[title] = charts.metric_chart(frame, title.lower(), height=180) if not frame.empty else None
    mem = pd.concat(
        [
            charts.series_frame(series, "mem_allocated", labels=_all_as(series, "allocated"), scale=charts.GIB),
            charts.series_frame(series, "mem_peak", labels=_all_as(series, "peak"), scale=charts.GIB),
        ],
        ignore_index=True,
    )
    out["Memory (GiB)"] = charts.metric_chart(mem, "GiB", height=180) if not mem.empty else None
    val = charts.series_frame(series, "val_loss", labels=_all_as(series, "val_loss"))
    out["Validation loss"] = charts.metric_chart(val, "val_loss", log_y=log_y) if not val.empty else None
    return out


_SPEC_CACHE: OrderedDict[tuple, dict[str, dict | None]] = OrderedDict()
_SPEC_CACHE_SIZE = 64


def run_chart_specs(series: pd.DataFrame, smoothing: float, log_y: bool) -> dict[str, dict | None]:
    """`run_charts` as Vega-Lite specs, built (and validated) once per distinct series: a live run's page redraws
    every 2 s and a finished run's data never changes, while building and validating four Altair charts costs
    about 0.3 s each time. The key is a hash of the series' values, so new metrics make new charts."""
    key = (int(pd.util.hash_pandas_object(series, index=False).sum()) if not series.empty else 0, len(series),
           float(smoothing), bool(log_y))  # fmt: skip
    if key in _SPEC_CACHE:
        _SPEC_CACHE.move_to_end(key)
        return dict(_SPEC_CACHE[key])  # a copy: callers pop what they place
    specs = {title: chart.to_dict() if chart is not None else None
             for title, chart in run_charts(series, smoothing, log_y).items()}  # fmt: skip
    _SPEC_CACHE[key] = specs
    while len(_SPEC_CACHE) > _SPEC_CACHE_SIZE:
        _SPEC_CACHE.popitem(last=False)
    return dict(specs)


def val_summary(numbers: pd.DataFrame) -> str | None:
    """'best val_loss 0.4321 at step 40 (3 measured)' from `registry.run_numbers` of one run, or None."""
    if numbers.empty or pd.isna(numbers["best_val_loss"].iloc[0]):
        return None
    r = numbers.iloc[0]
    return f"best val_loss {number(r.best_val_loss)} at step {int(r.best_val_step)} ({int(r.val_points)} measured)"


def best_checkpoint_lora(checkpoints: pd.DataFrame, numbers: pd.DataFrame) -> tuple[Path, int] | None:
    """(LoRA file, step) of the sound checkpoint at the best val_loss step, when the run saved one there."""
    if checkpoints is None or checkpoints.empty or numbers.empty or pd.isna(numbers["best_val_step"].iloc[0]):
        return None
    step = int(numbers["best_val_step"].iloc[0])
    for r in checkpoints.itertuples(index=False):
        sound = getattr(r, "problem", None) is None or pd.isna(r.problem)
        lora = Path(r.path) / "lora.safetensors"  # what zimage.training.checkpoints writes
        if not pd.isna(r.step) and int(r.step) == step and sound and lora.is_file():
            return lora, step
    return None


def _all_as(series: pd.DataFrame, label: str) -> dict[str, str]:
    return {run_id: label for run_id in (series["run_id"].unique() if not series.empty else [])}


def log_tail(run_dir: Path | str, lines: int = 40, block: int = 32768) -> str:
    """The last `lines` lines of the run's log.txt (reads only its end); '' when there is none."""
    path = Path(run_dir) / "log.txt"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - block))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r", "\n")
    return "\n".join(without_tracebacks([ln for ln in text.split("\n") if ln.strip()][-lines:], path))


_TRACEBACK_START = ("Traceback (most recent call last):", '  File "')


def without_tracebacks(lines: list[str], path: Path | str) -> list[str]:
    """Log lines with each Python traceback folded into one line that says where the whole of it is: the page
    shows the error itself (the exception line stays), the frames are for whoever debugs, in the file."""
    out: list[str] = []
    folded = 0
    for line in lines:
        if folded or line.startswith(_TRACEBACK_START):
            if folded == 0 or line.startswith((" ", "\t", "Traceback (most recent call last):")):
                folded += 1
                continue
            out.append(f"… {folded} lines of Python traceback left out (all of it is in {path}) …")
            folded = 0
        out.append(line)
    if folded:
        out.append(f"… {folded} lines of Python traceback left out (all of it is in {path}) …")
    return out


def lora_file(detail: dict) -> Path | None:
    """The run's finished LoRA (or fine-tune) file, when it exists."""
    status = detail.get("status") or {}
    path = detail.get("output_path") or status.get("output_path")
    if not path:
        return None
    p = Path(path)
    return p if p.is_file() else None


def file_reader(path: Path):
    """A callable for st.download_button: the file is read only when someone clicks."""
    return lambda: Path(path).read_bytes()


def thumbnail(settings: Settings, image: Path | str, size: int = THUMB_SIZE) -> Path | None:
    """A cached JPEG tile of a sample image (under cache/thumbs, never inside the worker's run folder): letterboxed
    square, so the sample gallery and the compare grid never stretch or crop an image (zimage.data.thumbnails)."""
    from zimage.data.thumbnails import write_thumbnail

    image = Path(image)
    try:
        st = image.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{image}:{st.st_size}:{st.st_mtime_ns}:{size}:tile".encode()).hexdigest()[:20]
    target = settings.cache_dir / "thumbs" / f"{key}.jpg"
    if target.exists():
        return target
    return write_thumbnail(image, target, size, quality=88, tile=True)


def sample_tiles(settings: Settings, samples: pd.DataFrame, step: int) -> list[tuple[str, str]]:
    """(thumbnail path, caption) of every sample image written at `step`."""
    out = []
    for r in samples[samples["step"] == step].itertuples(index=False):
        thumb = thumbnail(settings, r.path)
        if thumb is not None:
            out.append((str(thumb), f"{r.prompt or ''} · seed {r.seed}" if r.seed is not None else (r.prompt or "")))
    return out


def checkpoint_rows(df: pd.DataFrame) -> list[dict]:
    """The checkpoints table; `problem` says why one cannot be resumed from (its progress.json)."""
    from zimage.system import human_bytes

    return [
        {"checkpoint": r.name, "step": None if pd.isna(r.step) else int(r.step),
         "size": human_bytes(r.size or 0), "saved": clock(r.mtime),
         "val_loss": number(getattr(r, "val_loss", None)),
         "problem": "" if pd.isna(getattr(r, "problem", None)) else str(r.problem)}
        for r in df.itertuples(index=False)
    ]  # fmt: skip


NEWEST_CHECKPOINT = "the newest complete checkpoint"


def resume_choices(checkpoints) -> list[str]:
    """Resume targets for a stopped run: the newest complete one first, then each sound checkpoint, newest
    first (`checkpoints` as registry.checkpoints returns them; one with a problem is not offered)."""
    names = []
    if checkpoints is not None and len(checkpoints):
        rows = checkpoints.sort_values("step", ascending=False)
        problems = rows["problem"] if "problem" in rows else [None] * len(rows)
        names = [n for n, why in zip(rows["name"], problems, strict=True) if not (isinstance(why, str) and why)]
    return [NEWEST_CHECKPOINT, *names]
