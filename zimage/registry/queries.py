"""Read-only queries for the pages (Runs, Compare, Home). Plain functions; each takes a Registry (a page
gets the app's from `zimage.jobs.registry_for(settings)`) and returns plain data: pandas DataFrames for
tables, dicts for one run. Paths come back absolute.

Metric series are down-sampled in SQL: each (run, metric) series is cut into at most `max_points`
buckets by step and each bucket keeps min, max and last value, so a loss spike survives the thinning.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

from zimage.registry.db import Registry
from zimage.registry.schema import METRIC_COLUMNS, RegistryError
from zimage.runfolder import ACTIVE_STATES


def _runs_dir(reg: Registry) -> Path:
    return reg.path.parent / "runs"


def _as_list(value) -> list | None:
    if value is None or value == "" or value == []:
        return None
    return [value] if isinstance(value, str) else list(value)


RUN_LIST_COLUMNS = (
    "run_id, name, kind, user_name AS user, state, dataset, model, output_name, step, total_steps, "
    "CASE WHEN total_steps > 0 THEN least(greatest(step, 0)::DOUBLE / total_steps, 1.0) END AS progress, "
    "last_loss, last_lr, eta, coalesce(created, started) AS created, started, ended, heartbeat, gpu_ids, "
    "output_path, error, queue_order, metrics_rows, malformed_lines, samples_count, checkpoints_count, problem"
)


def list_runs(
    reg: Registry,
    state: str | Iterable[str] | None = None,
    user: str | Iterable[str] | None = None,
    dataset: str | Iterable[str] | None = None,
    text: str | None = None,
    kind: str | Iterable[str] | None = None,
    limit: int = 1000,
) -> pd.DataFrame:
    """Runs newest first, with a per-run summary (progress 0-1, last loss, ETA in seconds, paths)."""
    where, params = [], []
    for column, value in (("state", state), ("user_name", user), ("dataset", dataset), ("kind", kind)):
        values = _as_list(value)
        if values:
            where.append(f"{column} IN ({', '.join('?' * len(values))})")
            params += values
    if text and text.strip():
        where.append(
            "concat_ws(' ', run_id, name, output_name, dataset, model, user_name, kind, error, problem) ILIKE ?"
        )
        params.append(f"%{text.strip()}%")
    sql = f"SELECT {RUN_LIST_COLUMNS} FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY coalesce(created, started) DESC NULLS LAST, run_id DESC LIMIT ?"
    df = reg.fetch_df(sql, params + [int(limit)])
    if not df.empty:
        runs_dir = _runs_dir(reg)
        df["run_dir"] = [str(runs_dir / r) for r in df["run_id"]]
    return df


def run_detail(reg: Registry, run_id: str) -> dict | None:
    """Everything the registry knows about one run: columns, parsed config and status, run_dir."""
    with reg.read() as cur:
        res = cur.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
        cols = [d[0] for d in res.description]
        row = res.fetchone()
    if row is None:
        return None
    out = dict(zip(cols, row, strict=True))
    out["config"] = json.loads(out["config"]) if out.get("config") else {}
    out["status"] = json.loads(out["status"]) if out.get("status") else {}
    out["run_dir"] = str(_runs_dir(reg) / run_id)
    if out.get("last_sample_path"):
        out["last_sample_path"] = str(_runs_dir(reg) / run_id / out["last_sample_path"])
    return out


def filter_choices(reg: Registry) -> dict[str, list[str]]:
    """Distinct states, users, datasets and kinds, for the filter widgets."""
    out = {}
    for key, column in (("state", "state"), ("user", "user_name"), ("dataset", "dataset"), ("kind", "kind")):
        out[key] = [
            r[0] for r in reg.fetch(f"SELECT DISTINCT {column} FROM runs WHERE {column} IS NOT NULL ORDER BY 1")
        ]
    return out


def metric_series(
    reg: Registry,
    run_ids: str | Sequence[str],
    metrics: str | Sequence[str] = ("loss",),
    max_points: int = 500,
) -> pd.DataFrame:
    """Down-sampled series: one row per (run_id, metric, bucket) with columns step (last step in the
    bucket), step_first, min, max, last, n. At most `max_points` rows per series, in step order."""
    ids = _as_list(run_ids) or []
    names = _as_list(metrics) or []
    bad = [m for m in names if m not in METRIC_COLUMNS]
    if bad:
        raise RegistryError(f"metrics: {', '.join(bad)} unknown; known: {', '.join(METRIC_COLUMNS)}")
    if not ids or not names or max_points < 1:
        return pd.DataFrame(columns=["run_id", "metric", "bucket", "step", "step_first", "min", "max", "last", "n"])
    from zimage.registry.rows import run_time_of

    times = sorted({run_time_of(r) for r in ids})
    cols = ", ".join(names)  # checked against METRIC_COLUMNS above: safe to put in the SQL
    # One scan for all metrics (UNPIVOT drops the NULLs); run_time lets DuckDB skip other runs' row groups.
    sql = f"""
        WITH base AS (
            SELECT run_id, step, line, {cols} FROM metrics
            WHERE run_time IN ({", ".join("?" * len(times))}) AND run_id IN ({", ".join("?" * len(ids))})),
        long AS (UNPIVOT base ON {cols} INTO NAME metric VALUE v),
        bounds AS (SELECT run_id, metric, min(step) AS lo, max(step) AS hi FROM long GROUP BY run_id, metric),
        bucketed AS (
            SELECT long.*, least((step - lo) * ? // (hi - lo + 1), ? - 1) AS bucket
            FROM long JOIN bounds USING (run_id, metric))
        SELECT run_id, metric, bucket, max(step) AS step, min(step) AS step_first,
               min(v) AS min, max(v) AS max, arg_max(v, line) AS last, count(*) AS n
        FROM bucketed GROUP BY run_id, metric, bucket ORDER BY run_id, metric, bucket"""
    return reg.fetch_df(sql, times + ids + [int(max_points), int(max_points)])


def run_numbers(reg: Registry, run_ids: str | Sequence[str]) -> pd.DataFrame:
    """One row per run that logged metrics: final_loss (the last step's), best_val_loss and best_val_step
    (the lowest validation loss, the earliest step on a tie), val_points, s_per_step (median step time) and
    peak_memory (the highest mem_peak, bytes). For the Runs summary and the Compare table."""
    ids = _as_list(run_ids) or []
    cols = ["run_id", "final_loss", "best_val_loss", "best_val_step", "val_points", "s_per_step", "peak_memory"]
    if not ids:
        return pd.DataFrame(columns=cols)
    return reg.fetch_df(
        f"""SELECT run_id, arg_max(loss, step) FILTER (WHERE loss IS NOT NULL) AS final_loss,
                   min(val_loss) AS best_val_loss,
                   arg_min(step, (val_loss, step)) FILTER (WHERE val_loss IS NOT NULL) AS best_val_step,
                   count(val_loss) AS val_points, median(step_time) AS s_per_step, max(mem_peak) AS peak_memory
            FROM metrics WHERE run_id IN ({", ".join("?" * len(ids))}) GROUP BY run_id ORDER BY run_id""",
        ids,
    )


def samples(reg: Registry, run_id: str, step: int | None = None) -> pd.DataFrame:
    """Sample images of a run (optionally of one step), in step order; `path` is absolute."""
    sql = "SELECT step, prompt, seed, path, extra, line FROM samples WHERE run_id = ?"
    params: list = [run_id]
    if step is not None:
        sql += " AND step = ?"
        params.append(int(step))
    df = reg.fetch_df(sql + " ORDER BY step, line", params)
    if not df.empty:
        base = _runs_dir(reg) / run_id
        df["path"] = [str(base / p) for p in df["path"]]
    return df


def sample_steps(reg: Registry, run_id: str) -> list[int]:
    """The steps at which a run wrote samples (for a step slider)."""
    return [r[0] for r in reg.fetch("SELECT DISTINCT step FROM samples WHERE run_id = ? ORDER BY step", [run_id])]


def checkpoints(reg: Registry, run_id: str) -> pd.DataFrame:
    """A run's checkpoints (name, step, absolute path, size in bytes, mtime, problem, val_loss), oldest step
    first; `problem` is None for a whole checkpoint, else what is wrong with its progress.json."""
    df = reg.fetch_df(
        "SELECT name, step, path, size, mtime, problem, val_loss FROM checkpoints WHERE run_id = ? "
        "ORDER BY step NULLS LAST, name",
        [run_id],
    )
    if not df.empty:
        base = _runs_dir(reg) / run_id
        df["path"] = [str(base / p) for p in df["path"]]
    return df


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def config_diff(reg: Registry, run_ids: Sequence[str], all_keys: bool = False) -> pd.DataFrame:
    """Config keys (nested keys joined by '.') as rows, one column per run; by default only the keys
    whose values differ. Missing keys show as None."""
    ids = list(run_ids)
    if not ids:
        return pd.DataFrame()
    found = dict(reg.fetch(f"SELECT run_id, config FROM runs WHERE run_id IN ({', '.join('?' * len(ids))})", ids))
    missing = [r for r in ids if r not in found]
    if missing:
        raise RegistryError(f"run {missing[0]}: not in the registry")
    flat = {r: _flatten(json.loads(found[r] or "{}")) for r in ids}
    keys = sorted(set().union(*flat.values()))
    rows = {}
    for key in keys:
        values = [flat[r].get(key) for r in ids]
        if all_keys or any(json.dumps(v, sort_keys=True) != json.dumps(values[0], sort_keys=True) for v in values):
            rows[key] = [v if v is None or isinstance(v, str | int | float | bool) else json.dumps(v) for v in values]
    df = pd.DataFrame.from_dict(rows, orient="index", columns=ids)
    df.index.name = "key"
    return df


def queue(reg: Registry) -> pd.DataFrame:
    """Queued jobs in the order they will start (position 1 starts next: priority, then queue order), then the
    ones running now; `priority`, `waiting` (why a queued job has not started), `backend` (where it runs: unset
    for a queued job that follows the home's launcher) and `backend_job_id` come from status.json."""
    active = ", ".join(f"'{s}'" for s in ACTIVE_STATES)
    rank = "CASE json_extract_string(status, '$.priority') WHEN 'high' THEN 0 WHEN 'low' THEN 2 ELSE 1 END"
    return reg.fetch_df(
        f"""SELECT CASE WHEN state = 'queued' THEN row_number() OVER (
                       PARTITION BY state = 'queued' ORDER BY {rank}, queue_order, run_id) END AS position,
                   run_id, kind, name, user_name AS user, state, gpus, gpu_ids, created, started, step, total_steps,
                   coalesce(json_extract_string(status, '$.priority'), 'normal') AS priority,
                   CASE WHEN state = 'queued' THEN json_extract_string(status, '$.waiting') END AS waiting,
                   json_extract_string(status, '$.backend') AS backend,
                   json_extract_string(status, '$.backend_job_id') AS backend_job_id
            FROM runs WHERE state = 'queued' OR state IN ({active})
            ORDER BY state <> 'queued', {rank}, queue_order, run_id"""
    )


def list_jobs(reg: Registry, kind: str | Iterable[str] | None = None, limit: int = 500) -> pd.DataFrame:
    """Jobs that are not training runs (captioning, test grids), newest first."""
    wanted = _as_list(kind) or [k for (k,) in reg.fetch("SELECT DISTINCT kind FROM runs") if k and k != "train"]
    if not wanted:
        return list_runs(reg, kind=["\x00none"], limit=limit)  # an empty frame with the usual columns
    return list_runs(reg, kind=wanted, limit=limit)


def damaged_runs(reg: Registry, limit: int = 50) -> pd.DataFrame:
    """Runs with a damaged status.json or config.json (run_id, name, kind, state, problem), newest first:
    pages list them whatever their filters, so a damaged run never just disappears."""
    return reg.fetch_df(
        "SELECT run_id, name, kind, state, problem FROM runs WHERE problem IS NOT NULL "
        "ORDER BY coalesce(created, started) DESC NULLS LAST, run_id DESC LIMIT ?",
        [int(limit)],
    )


def datasets(reg: Registry) -> pd.DataFrame:
    """Datasets with their image and caption counts (from dataset.json and the images folder)."""
    return reg.fetch_df("SELECT * FROM datasets ORDER BY name")


def overview(reg: Registry) -> dict:
    """Counts for the Home page: runs per state, queue length, running now, datasets."""
    per_state = dict(reg.fetch("SELECT state, count(*) FROM runs GROUP BY state"))
    return {
        "runs": sum(per_state.values()),
        "per_state": per_state,
        "queued": per_state.get("queued", 0),
        "active": sum(per_state.get(s, 0) for s in ACTIVE_STATES),
        "datasets": reg.fetch("SELECT count(*) FROM datasets")[0][0],
    }
