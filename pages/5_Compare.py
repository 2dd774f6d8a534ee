"""Compare: runs side by side — curves, the settings that differ, sample grid, and a test grid job."""

import streamlit as st

from zimage import jobs, registry
from zimage.errors import UserError
from zimage.settings import get_settings
from zimage.users import current_user
from zimage.views import compare as cv
from zimage.views import keep_user_name, open_registry, shown_errors
from zimage.views.auth import page_actor
from zimage.views.format import fraction, progress_text
from zimage.views.runs import thumbnail

st.set_page_config(page_title="Compare", page_icon="⚖️", layout="wide")
keep_user_name(st.session_state)
settings = get_settings().ensure()
jobs.ensure_scheduler(settings)
ss = st.session_state
st.title("Compare")
actor = page_actor(st, settings)  # password/oidc: the sign-in form until someone is signed in
login = st.user.to_dict()
if actor.mode == "none" and not login.get("is_logged_in"):
    st.sidebar.text_input("Your name (recorded on the jobs you start)", key="user_name")


def compare(reg) -> None:
    """Pick runs; curves, settings that differ, sample grid, test-grid form."""
    runs = registry.list_runs(reg, kind="train", limit=1000)
    labels = cv.run_labels(runs)
    linked = st.query_params.get("runs")
    if linked and ss.get("cmp_linked") != linked:  # a link (or a reload) names the runs: show those
        ss["cmp_runs"] = cv.parse_runs_param(linked, list(labels)) or list(labels)[:2]
        ss["cmp_linked"] = linked
    elif "cmp_runs" not in ss:
        ss["cmp_runs"] = list(labels)[:2]
    picked = st.multiselect(
        "Runs", list(labels), format_func=labels.get, key="cmp_runs", max_selections=12, persist_state="session"
    )
    st.query_params["runs"] = ",".join(picked)
    if not picked:
        st.info("Pick one or more training runs to compare." if labels else "No training runs yet: start one on Train.")
        st.stop()

    st.subheader("Curves")
    c1, c2, c3, c4 = st.columns(4)
    metric = c1.selectbox(
        "Metric",
        list(cv.COMPARE_METRICS),
        format_func=cv.COMPARE_METRICS.get,
        key="cmp_metric",
        persist_state="session",
    )
    smoothing = c2.slider("Smoothing (EMA)", 0.0, 0.99, 0.6, 0.01, key="cmp_smoothing", persist_state="session")
    x_axis = c3.radio("x axis", ["step", "wall time"], horizontal=True, key="cmp_x", persist_state="session")
    log_y = c4.toggle("Log scale", key="cmp_log", persist_state="session")
    series = registry.metric_series(
        reg, picked, [metric, "elapsed"] if x_axis == "wall time" else [metric], max_points=400
    )
    chart = cv.curves(series, metric, smoothing, labels, x_axis, log_y, order=picked)
    if chart is None:
        st.caption(f"No {cv.COMPARE_METRICS[metric]} logged by these runs yet.")
    else:
        st.altair_chart(chart, key="cmp_chart")

    st.subheader("Settings that differ")
    diff = cv.diff_table(registry.config_diff(reg, picked), labels)
    if len(picked) < 2:
        st.caption("Pick a second run to see what differs.")
    elif diff.empty:
        st.caption("These runs have the same settings.")
    else:
        st.dataframe(diff, key="cmp_diff")

    st.subheader("By the numbers")
    numbers = cv.numbers_table(registry.run_numbers(reg, picked), registry.config_diff(reg, picked), labels, picked)
    st.dataframe(numbers, key="cmp_numbers", hide_index=True)
    st.download_button("Download CSV", cv.table_csv(numbers), "compare.csv", "text/csv", key="cmp_csv")
    sweep = cv.sweep_chart(numbers)
    if sweep is None:
        st.caption("Pick two or more runs with a loss to see the settings against it.")
    else:
        st.caption("Each line is a run across the settings that differ; colour: the number at the right.")
        st.altair_chart(sweep, key="cmp_sweep")

    st.subheader("Samples")
    samples = {run_id: registry.samples(reg, run_id) for run_id in picked}
    keys = cv.sample_keys(samples)
    if not keys:
        st.caption("No samples yet: runs write them every `sample_every_n_steps`.")
    else:
        key = st.selectbox(
            "Prompt and seed", keys, format_func=lambda k: f"{k[0][:80]} · seed {k[1]}", key="cmp_sample"
        )
        steps, grid = cv.sample_grid(samples, key)
        header = st.columns(len(steps) + 1)
        for col, step in zip(header[1:], steps, strict=True):
            col.caption(f"step {step}")
        for run_id, paths in grid.items():
            row = st.columns(len(steps) + 1)
            row[0].caption(labels[run_id])
            for col, path in zip(row[1:], paths, strict=True):
                thumb = thumbnail(settings, path) if path else None
                if thumb:
                    col.image(str(thumb))
                else:
                    col.caption("—")

    st.subheader("Test grid")
    details = [registry.run_detail(reg, run_id) for run_id in picked]
    choices = cv.lora_choices(details, {run_id: registry.checkpoints(reg, run_id) for run_id in picked})
    if not choices:
        st.caption("The picked runs have no LoRA file or checkpoint yet.")
    else:
        config = details[0]["config"]
        with st.form("cmp_grid_form"):
            chosen = st.multiselect("LoRAs / checkpoints", list(choices), default=list(choices)[:4],
                                    format_func=choices.get, key="cmp_grid_loras")  # fmt: skip
            prompt = st.text_area(
                "Prompt", cv.grid_prompt(config, cv.dataset_trigger(reg, details[0]["dataset"])), key="cmp_grid_prompt"
            )
            g1, g2, g3 = st.columns(3)
            strengths = g1.text_input("Strengths", "0, 0.5, 1", key="cmp_grid_strengths", persist_state="session")
            seed = g2.number_input("Seed", 0, 2**31 - 1, 42, key="cmp_grid_seed", persist_state="session")
            size = g3.number_input(
                "Size", 64, 2048, min(512, int(config.get("resolution") or 512)), 16, key="cmp_grid_size"
            )
            if st.form_submit_button("Render test grid", key="cmp_grid_go"):
                try:
                    cfg = cv.testgrid_config(details[0]["model"] or config.get("model_path", ""), prompt, seed, strengths,
                                             {p: choices[p] for p in chosen}, size, name=f"grid-{cv.run_name(details[0])}")  # fmt: skip
                    run_id = cv.queue_testgrid(settings, cfg, current_user(login, ss.get("user_name")), actor=actor)
                    st.success(f"Queued test grid {run_id}; it appears below when it starts.")
                except UserError as exc:
                    st.error(str(exc))


@st.fragment(run_every=3)
def grids(reg) -> None:
    """The latest test-grid jobs: progress, then the grid image."""
    with shown_errors(st.error):
        for job in cv.grid_jobs(registry.list_runs(reg, kind="testgrid", limit=3)):
            text = f"{job['name']} · " + progress_text(job["step"], job["total_steps"], state=job["state"])
            st.progress(fraction(job["step"], job["total_steps"]), text=text)
            if job["error"]:
                st.error(str(job["error"]).strip().splitlines()[0])
            if job["grid"]:
                st.image(job["grid"], caption=f"{job['run_id']}: rows = LoRAs, columns = strengths")


with shown_errors(st.error):
    reg = open_registry(settings)
    compare(reg)
    grids(reg)
