"""The Compare page: runs side by side — curves on one chart, the settings that differ, a sample grid
(rows = runs, columns = steps, one prompt and seed) and the choices of a test-grid job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from zimage.errors import UserError
from zimage.settings import Settings
from zimage.views import charts
from zimage.views.runs import run_label

COMPARE_METRICS = {
    "loss": "loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "step_time": "step time (s)",
    "mem_peak": "peak memory (GiB)",
}
MAX_GRID_STEPS = 8


def run_labels(df: pd.DataFrame) -> dict[str, str]:
    """run_id -> a short unique label for legends and tables."""
    labels: dict[str, str] = {}
    for row in df.to_dict("records"):
        label = run_label(row)
        if label in labels.values():
            label = f"{label} ({row['run_id'][-4:]})"
        labels[row["run_id"]] = label
    return labels


def run_name(detail: Mapping[str, Any]) -> str:
    """What people call a run: its name, else its output name, else its id."""
    return str(detail.get("name") or detail.get("output_name") or detail["run_id"])


def parse_runs_param(value: str | None, known: Sequence[str]) -> list[str]:
    """The `?runs=a,b` query parameter as known run ids, in order, without repeats."""
    out = []
    for part in (value or "").split(","):
        part = part.strip()
        if part in known and part not in out:
            out.append(part)
    return out


def wall_time_axes(series: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """run_id -> (steps, elapsed minutes), from the `elapsed` metric, to plot against wall time."""
    out = {}
    part = series[series["metric"] == "elapsed"] if not series.empty else series
    for run_id, rows in part.groupby("run_id"):
        rows = rows.sort_values("step")
        out[run_id] = (rows["step"].to_numpy(dtype=float), rows["last"].to_numpy(dtype=float) / 60.0)
    return out


def curves(
    series: pd.DataFrame,
    metric: str,
    smoothing: float,
    labels: Mapping[str, str],
    x: str = "step",
    log_y: bool = False,
    order: Sequence[str] | None = None,
):
    """One Altair chart: `metric` of every run in `series`, x = step or wall time (minutes). `order` (the
    picked run ids) gives each run its colour, the same on every chart of the page."""
    x_of = wall_time_axes(series) if x == "wall time" else None
    scale = charts.GIB if metric.startswith("mem_") else 1.0
    frame = charts.series_frame(series, metric, smoothing, labels=labels, x_of=x_of, scale=scale)
    if frame.empty:
        return None
    x_title = "wall time (min)" if x == "wall time" else "step"
    return charts.metric_chart(
        frame, COMPARE_METRICS.get(metric, metric), x_title, log_y, smoothed=smoothing > 0, height=320,
        series_order=[labels.get(r, r) for r in order] if order is not None else None,
    )  # fmt: skip


def diff_table(diff: pd.DataFrame, labels: Mapping[str, str]) -> pd.DataFrame:
    """config_diff output with run labels as column names and every value as text (mixed types per row)."""
    if diff.empty:
        return diff
    out = diff.copy()
    out.columns = [labels.get(c, c) for c in out.columns]
    return out.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))


def sample_keys(samples_by_run: Mapping[str, pd.DataFrame]) -> list[tuple[str, int | None]]:
    """(prompt, seed) pairs with samples, those shared by the most runs first."""
    counts: dict[tuple[str, int | None], int] = {}
    for df in samples_by_run.values():
        if df.empty:
            continue
        for key in {(r.prompt or "", None if pd.isna(r.seed) else int(r.seed)) for r in df.itertuples(index=False)}:
            counts[key] = counts.get(key, 0) + 1
    return sorted(counts, key=lambda k: (-counts[k], k[0], k[1] if k[1] is not None else -1))


def sample_grid(
    samples_by_run: Mapping[str, pd.DataFrame], key: tuple[str, int | None], max_steps: int = MAX_GRID_STEPS
) -> tuple[list[int], dict[str, list[str | None]]]:
    """(columns = steps, rows: run_id -> image path per step or None) for one prompt and seed.

    With more steps than `max_steps`, evenly spaced ones are kept (always the first and the last).
    """
    prompt, seed = key
    picked: dict[str, dict[int, str]] = {}
    for run_id, df in samples_by_run.items():
        if df.empty:
            picked[run_id] = {}
            continue
        seeds = df["seed"].astype("float")
        match = df[(df["prompt"].fillna("") == prompt) & ((seeds == seed) if seed is not None else seeds.isna())]
        picked[run_id] = {int(r.step): r.path for r in match.itertuples(index=False)}
    steps = sorted({s for by_step in picked.values() for s in by_step})
    if len(steps) > max_steps:
        idx = np.unique(np.linspace(0, len(steps) - 1, max_steps).round().astype(int))
        steps = [steps[i] for i in idx]
    return steps, {run_id: [by_step.get(s) for s in steps] for run_id, by_step in picked.items()}


def checkpoint_lora(path: Path | str) -> Path | None:
    """The LoRA file of a checkpoint entry: the file itself, or the LoRA .safetensors inside its folder."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    if not path.is_dir():
        return None
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
    # resume state (optimizer, model copies) sits beside the LoRA; prefer files named like a LoRA
    preferred = [p for p in files if "lora" in p.name.lower()] or [
        p for p in files if not any(w in p.name.lower() for w in ("optimizer", "scheduler", "model", "random"))
    ]
    return preferred[0] if preferred else None


def lora_choices(details: Sequence[dict], checkpoints_by_run: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    """LoRA path -> label: each run's final LoRA, then its checkpoints (newest step first)."""
    from zimage.views.runs import lora_file

    out: dict[str, str] = {}
    for d in details:
        name = run_name(d)
        final = lora_file(d)
        if final is not None and final.suffix == ".safetensors":
            out[str(final)] = f"{name} (final)"
        ckpts = checkpoints_by_run.get(d["run_id"])
        if ckpts is not None and not ckpts.empty:
            for r in ckpts.sort_values("step", ascending=False, na_position="last").itertuples(index=False):
                lora = checkpoint_lora(r.path)
                if lora is not None and str(lora) not in out:
                    out[str(lora)] = f"{name} @ step {int(r.step)}" if not pd.isna(r.step) else f"{name} / {r.name}"
    return out


def grid_prompt(config: Mapping[str, Any], dataset_trigger: str | None = None) -> str:
    """The test grid's first prompt: the run's sample prompt, else its (or its dataset's) trigger word."""
    trigger = config.get("trigger_word") or dataset_trigger
    return config.get("sample_prompt") or (f"{trigger}, a photo" if trigger else "a photo")


def dataset_trigger(reg, dataset: str | None) -> str | None:
    """The trigger word the registry knows for a dataset name."""
    from zimage import registry

    if not dataset:
        return None
    rows = registry.datasets(reg)
    match = rows[rows["name"] == dataset]["trigger_word"] if not rows.empty else []
    return (match.iloc[0] or None) if len(match) else None


def parse_strengths(text: str) -> list[float]:
    """'0, 0.5, 1' -> [0.0, 0.5, 1.0]; a UserError names the field when a part is not a number."""
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"Strengths: {text!r} must be numbers separated by commas, e.g. 0, 0.5, 1") from None
    if not values:
        raise UserError("Strengths: give at least one number, e.g. 0, 0.5, 1")
    return values


def testgrid_config(
    model_path: str,
    prompt: str,
    seed: int,
    strengths_text: str,
    loras: Mapping[str, str],
    size: int,
    steps: int | None = None,
    cfg: float | None = None,
    name: str = "",
) -> dict[str, Any]:
    """The config.json of a test-grid job (checked later by zimage.testgrid.check_config)."""
    return {
        "model_path": model_path, "prompt": prompt, "seed": int(seed), "strengths": parse_strengths(strengths_text),
        "loras": [{"label": label, "path": path} for path, label in loras.items()],
        "width": int(size), "height": int(size), "steps": steps, "cfg": cfg, "name": name,
    }  # fmt: skip


def queue_testgrid(settings: Settings, config: dict[str, Any], user: str | None, actor=None) -> str:
    """Check a test-grid config and queue it; returns the job's run id (the registry knows it at once)."""
    from zimage import jobs
    from zimage.jobs.scheduler import refresh_run
    from zimage.testgrid import check_config

    if not user:
        raise UserError("Your name: type it in the sidebar first, so the team knows whose job this is.")
    check_config(config, settings)
    run_id = jobs.enqueue(settings, "testgrid", config, user=user, name=config.get("name") or None, actor=actor)
    refresh_run(settings, run_id)
    return run_id


def grid_jobs(df: pd.DataFrame) -> list[dict]:
    """Test-grid jobs (list_runs rows of kind testgrid), with their grid image once written."""
    out = []
    for row in df.to_dict("records"):
        grid = Path(row["run_dir"]) / "grid.png"
        out.append({**row, "grid": str(grid) if grid.is_file() else None})
    return out


# -- by the numbers ------------------------------------------------------------------------------------
NUMBER_COLUMNS = ["run", "final loss", "best val_loss", "best val step", "s/step", "peak memory (GiB)"]
IGNORED_DIFF_KEYS = ("output_name", "output_dir", "name")  # differ between any two runs; say nothing


def numbers_table(numbers: pd.DataFrame, diff: pd.DataFrame, labels: Mapping[str, str], run_ids: Sequence[str]):
    """Runs as rows: final loss, best val_loss and its step, median s/step, peak memory, then the config
    fields that differ (`registry.config_diff` output), one column each."""
    by_run = numbers.set_index("run_id") if not numbers.empty else pd.DataFrame()
    keys = [k for k in (diff.index if not diff.empty else []) if k not in IGNORED_DIFF_KEYS]
    rows = []
    for run_id in run_ids:
        n = by_run.loc[run_id] if run_id in by_run.index else {}

        def get(col, n=n):
            v = n.get(col) if hasattr(n, "get") else None
            return None if v is None or pd.isna(v) else v

        peak = get("peak_memory")
        step = get("best_val_step")
        row = {"run": labels.get(run_id, run_id), "final loss": get("final_loss"), "best val_loss": get("best_val_loss"),
               "best val step": None if step is None else int(step), "s/step": get("s_per_step"),
               "peak memory (GiB)": None if peak is None else peak / charts.GIB}  # fmt: skip
        row.update({k: diff.loc[k, run_id] for k in keys})
        rows.append(row)
    return pd.DataFrame(rows, columns=NUMBER_COLUMNS + keys)


def table_csv(table: pd.DataFrame) -> bytes:
    """The numbers table as CSV for the download button."""
    return table.to_csv(index=False).encode("utf-8")


def sweep_chart(table: pd.DataFrame):
    """Parallel coordinates of the differing config fields against best val_loss (else the final loss), or
    None when fewer than two runs have that number."""
    score = "best val_loss" if table["best val_loss"].notna().sum() >= 2 else "final loss"
    rows = table[table[score].notna()]
    if len(rows) < 2:
        return None
    axes = [c for c in table.columns[len(NUMBER_COLUMNS) :] if rows[c].notna().all()] + [score]
    frame = charts.parallel_frame(rows, axes)
    return charts.parallel_chart(frame, rows.set_index("run")[score], score)
