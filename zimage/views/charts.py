"""EMA smoothing and the Altair charts of the Runs, Compare and Train pages.

Series come from `zimage.registry.metric_series` (down-sampled in SQL: per bucket the min, max and last
value). A chart draws the min-max band lightly (a loss spike stays visible after thinning), the raw
values thinly and the smoothed line on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import altair as alt
import numpy as np
import pandas as pd

GIB = 1024**3
SERIES_COLUMNS = ["series", "x", "value", "smooth", "lo", "hi"]
# Vega's "tableau20" colours with the ten strong ones first: tableau20 pairs each hue with its light tint, so
# in its own order the first two runs would be blue and light blue. Ten hues, then their tints.
RUN_COLOURS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#b279a2", "#439894", "#b79a20", "#79706e", "#d67195",
               "#9e765f", "#9ecae9", "#ffbf79", "#88d27a", "#ff9d98", "#d6a5c9", "#83bcb6", "#f2cf5b", "#bab0ac",
               "#fcbfd2", "#d8b5a5")  # fmt: skip


def ema(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style exponential moving average with debiasing; weight 0 returns the values.

    NaN / missing values keep the previous smoothed value, so one bad step does not break the line.
    """
    weight = min(max(float(weight), 0.0), 0.999)
    out: list[float] = []
    acc, count, last = 0.0, 0, math.nan
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(last)
            continue
        acc = acc * weight + (1 - weight) * float(v)
        count += 1
        last = acc / (1 - weight**count) if weight > 0 else float(v)
        out.append(last)
    return out


def series_frame(
    df: pd.DataFrame,
    metric: str,
    smoothing: float = 0.0,
    labels: Mapping[str, str] | None = None,
    x_of: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    scale: float = 1.0,
) -> pd.DataFrame:
    """One metric of `metric_series` output as plot rows: series (run label), x, value, smooth, lo, hi.

    `x_of` maps a run to (steps, x values) to plot against something else than the step (wall time);
    `scale` divides the values (bytes -> GiB).
    """
    part = df[df["metric"] == metric] if not df.empty else df
    frames = []
    for run_id, rows in part.groupby("run_id", sort=False):
        rows = rows.sort_values("step")
        steps = rows["step"].to_numpy(dtype=float)
        if x_of is not None and run_id in x_of:
            xs_steps, xs = x_of[run_id]
            x = np.interp(steps, xs_steps, xs) if len(xs_steps) else steps
        else:
            x = steps
        values = rows["last"].to_numpy(dtype=float) / scale
        frames.append(
            pd.DataFrame(
                {
                    "series": (labels or {}).get(run_id, run_id),
                    "x": x,
                    "value": values,
                    "smooth": ema(values.tolist(), smoothing),
                    "lo": rows["min"].to_numpy(dtype=float) / scale,
                    "hi": rows["max"].to_numpy(dtype=float) / scale,
                }
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SERIES_COLUMNS)


def metric_chart(
    frame: pd.DataFrame,
    y_title: str,
    x_title: str = "step",
    log_y: bool = False,
    smoothed: bool = False,
    height: int = 240,
    series_order: Sequence[str] | None = None,
) -> alt.LayerChart:
    """Band (min-max per bucket) + raw line + smoothed line + invisible hover points, one colour per series.

    `series_order` fixes the colour of each series (see `series_colours`): pass the same list to every chart
    of a page and a run has one colour on all of them. A log axis spans the data, not whole decades.
    """
    data = frame.copy()
    if log_y:  # a log axis cannot show zero or negative values
        data = data[data["value"] > 0]
        positive = data["value"].min() if not data.empty else 1.0
        data["lo"] = data["lo"].where(data["lo"] > 0, positive)
    if log_y and not data.empty:  # span the data: Vega-Lite's "nice" log domain rounds out to whole decades
        scale = alt.Scale(type="log", nice=False, domain=[float(data["lo"].min()), float(data["hi"].max())])
    else:
        scale = alt.Scale(type="log") if log_y else alt.Scale(zero=False)
    x = alt.X("x:Q", title=x_title, axis=alt.Axis(tickMinStep=1) if x_title == "step" else alt.Axis())
    many = data["series"].nunique() > 1
    # Every layer carries the same legend (Vega-Lite merges them); its symbols are drawn solid, not as faint
    # as the band that comes first.
    legend = (
        alt.Legend(orient="bottom", labelLimit=400, symbolType="stroke", symbolOpacity=1, symbolStrokeWidth=3)
        if many
        else None
    )
    order = list(series_order) if series_order is not None else list(dict.fromkeys(data["series"]))
    color = alt.Color("series:N", title=None, legend=legend, scale=series_colours(order))
    base = alt.Chart().encode(x=x, color=color)  # the data goes on the layer once: altair then need not compare
    # (hash) a copy per layer, which was most of the time a chart took to build
    tooltip = [alt.Tooltip("series:N", title="run"), alt.Tooltip("x:Q", title=x_title, format=",.4g"),
               alt.Tooltip("value:Q", format=".4g"), alt.Tooltip("smooth:Q", title="smoothed", format=".4g")]  # fmt: skip
    band = base.mark_area(opacity=0.12).encode(y=alt.Y("lo:Q", scale=scale, title=y_title), y2="hi:Q")
    raw = base.mark_line(opacity=0.35 if smoothed else 1.0, strokeWidth=1).encode(
        y=alt.Y("value:Q", scale=scale, title=y_title), tooltip=tooltip
    )
    layers = [band, raw]
    if smoothed:
        layers.append(
            base.mark_line(strokeWidth=2).encode(y=alt.Y("smooth:Q", scale=scale, title=y_title), tooltip=tooltip)
        )
    # hover anywhere near a point, not only exactly on the thin line: step, value and run
    layers.append(base.mark_circle(size=60, opacity=0).encode(y=alt.Y("value:Q", scale=scale), tooltip=tooltip))
    return alt.layer(*layers, data=data).properties(height=height).interactive(bind_y=False)


def series_colours(order: Sequence[str]) -> alt.Scale:
    """One fixed colour per series name, in `order`: 20 categorical colours, ten hues first, so 10+ runs stay
    distinguishable (the Compare page takes at most 12); the same order gives the same colours on every chart."""
    return alt.Scale(domain=list(order), range=list(RUN_COLOURS))


def memory_chart(rows: Sequence[Mapping]) -> alt.Chart:
    """Stacked bars: one per phase of a run, split into what takes the memory (rows: phase, item, gib)."""
    data = pd.DataFrame(list(rows), columns=["phase", "item", "gib"])
    return (
        alt.Chart(data)
        .mark_bar()
        .encode(
            y=alt.Y("phase:N", title=None, sort=None, axis=alt.Axis(labelLimit=200)),
            x=alt.X("sum(gib):Q", title="GiB"),
            color=alt.Color("item:N", title=None, legend=alt.Legend(orient="bottom", columns=2, labelLimit=180)),
            tooltip=["phase", "item", alt.Tooltip("gib:Q", format=".2f")],
        )
        .properties(height=alt.Step(34))  # a fixed band per phase: the legend below cannot squash the bars
    )


def parallel_frame(table: pd.DataFrame, axes: Sequence[str], run_column: str = "run") -> pd.DataFrame:
    """Long rows (run, axis, position, value, level) for a parallel-coordinates chart of `table`'s `axes`.

    Each axis is scaled to 0-1 on its own (min to max; one value: 0.5); a non-numeric axis places its
    values in sorted order. `value` keeps the text shown in the tooltip.
    """
    rows = []
    for i, axis in enumerate(axes):
        column = table[axis]
        numeric = pd.to_numeric(column, errors="coerce")
        if numeric.notna().all():
            lo, hi = float(numeric.min()), float(numeric.max())
            levels = (numeric - lo) / (hi - lo) if hi > lo else numeric * 0 + 0.5
        else:
            order = sorted(column.astype(str).unique())
            levels = column.astype(str).map(lambda v, o=order: o.index(v) / max(1, len(o) - 1))
        for run, raw, level in zip(table[run_column], column, levels, strict=True):
            rows.append({"run": run, "axis": axis, "position": i, "value": f"{raw:.4g}" if isinstance(raw, float) else str(raw),
                         "level": float(level)})  # fmt: skip
    return pd.DataFrame(rows, columns=["run", "axis", "position", "value", "level"])


def parallel_chart(frame: pd.DataFrame, colour: pd.Series, colour_title: str, height: int = 280) -> alt.LayerChart:
    """Parallel coordinates: one line per run across the axes of `parallel_frame`, coloured by `colour`
    (run -> number, e.g. best val_loss: the lower, the better)."""
    data = frame.assign(score=frame["run"].map(colour).astype(float))
    x = alt.X("axis:N", sort=list(dict.fromkeys(data.sort_values("position")["axis"])), title=None,
              axis=alt.Axis(labelAngle=0, labelLimit=200))  # fmt: skip
    y = alt.Y("level:Q", axis=None, scale=alt.Scale(domain=[0, 1]))
    tooltip = [alt.Tooltip("run:N"), alt.Tooltip("axis:N"), alt.Tooltip("value:N"),
               alt.Tooltip("score:Q", title=colour_title, format=".5g")]  # fmt: skip
    colour_enc = alt.Color("score:Q", title=colour_title, scale=alt.Scale(scheme="viridis", reverse=True))
    lines = alt.Chart(data).mark_line(strokeWidth=2).encode(x=x, y=y, detail="run:N", color=colour_enc, tooltip=tooltip)
    points = alt.Chart(data).mark_circle(size=60).encode(x=x, y=y, color=colour_enc, tooltip=tooltip)
    rules = alt.Chart(data).mark_rule(color="#bbb").encode(x=x)
    return alt.layer(rules, lines, points).properties(height=height)
