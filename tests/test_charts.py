"""Charts a person can read: a log axis that spans the data, one colour per run on every chart, hover
that names step, value and run (issue 15, item 9)."""

from __future__ import annotations

import pandas as pd

from zimage.views import charts
from zimage.views import compare as cv


def series(run_id: str, values: list[float], metric: str = "loss") -> pd.DataFrame:
    n = len(values)
    return pd.DataFrame({"run_id": run_id, "metric": metric, "bucket": range(n), "step": range(1, n + 1),
                         "step_first": range(1, n + 1), "min": values, "max": values, "last": values, "n": 1})  # fmt: skip


def layer_scale(spec: dict, layer: int) -> dict:
    return spec["layer"][layer]["encoding"]["y"]["scale"]


def test_log_axis_spans_the_data_not_whole_decades():
    frame = charts.series_frame(series("a", [0.31, 0.12, 0.052, 0.047]), "loss")
    spec = charts.metric_chart(frame, "loss", log_y=True).to_dict()
    scale = layer_scale(spec, 1)
    assert scale["type"] == "log" and scale["nice"] is False
    assert scale["domain"] == [0.047, 0.31]  # not [0.01, 1]
    linear = layer_scale(charts.metric_chart(frame, "loss").to_dict(), 1)
    assert linear.get("type") != "log" and "domain" not in linear


def test_each_run_keeps_its_colour_on_every_chart():
    labels = {f"r{i}": f"run {i}" for i in range(12)}
    df = pd.concat([series(r, [1.0 / (i + 1), 0.5 / (i + 1)], m) for i, r in enumerate(labels) for m in ("loss", "lr")])
    picked = list(labels)
    loss = cv.curves(df, "loss", 0.0, labels, order=picked).to_dict()
    # the lr chart holds only some of the runs, in another order: the colours must not move
    lr_only = df[(df["metric"] == "lr") & df["run_id"].isin(picked[::-3])]
    lr = cv.curves(lr_only, "lr", 0.0, labels, order=picked).to_dict()
    for spec in (loss, lr):
        colour = spec["layer"][1]["encoding"]["color"]
        assert colour["scale"]["domain"] == [labels[r] for r in picked]
        assert colour["scale"]["range"] == list(charts.RUN_COLOURS)
        assert colour["legend"] is not None  # run names in the legend
    assert len(set(charts.RUN_COLOURS)) == 20  # 12 runs, 12 different colours


def test_hover_names_step_value_and_run():
    frame = charts.series_frame(pd.concat([series("a", [1.0, 0.5]), series("b", [2.0, 1.0])]), "loss", 0.5)
    spec = charts.metric_chart(frame, "loss", smoothed=True).to_dict()
    hover = spec["layer"][-1]
    assert hover["mark"]["type"] == "circle" and hover["mark"]["opacity"] == 0
    titles = {t.get("title", t["field"]) for t in hover["encoding"]["tooltip"]}
    assert {"run", "step", "value"} <= titles


def test_run_chart_specs_are_built_once_per_series():
    from zimage.views import runs as rv

    df = pd.concat([series("a", [1.0, 0.5, 0.25]), series("a", [1e-4] * 3, "lr")])
    first = rv.run_chart_specs(df, 0.6, False)
    assert first["Loss"]["layer"][0]["mark"]["type"] == "area"
    first.pop("Loss")  # the page pops what it places: the cache must not lose it
    again = rv.run_chart_specs(df, 0.6, False)
    assert again["Loss"] is not None and again["Learning rate"] is rv.run_chart_specs(df, 0.6, False)["Learning rate"]
    grown = pd.concat([df, series("a", [0.1, 0.1, 0.1, 0.05])])  # a new metric line: new charts
    assert rv.run_chart_specs(grown, 0.6, False)["Loss"] != again["Loss"]
    assert rv.run_chart_specs(df, 0.0, True)["Loss"] != again["Loss"]  # other settings: other charts
