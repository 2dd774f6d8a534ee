"""Runs: every run with its state and progress; one run live — charts, samples, log, controls, download."""

import streamlit as st

from zimage import jobs, registry
from zimage.errors import UserError
from zimage.registry.events import run_timeline
from zimage.settings import get_settings
from zimage.views import keep_user_name, open_registry, page_link, shown_errors
from zimage.views import runs as rv
from zimage.views.auth import control_state, events_rows, page_actor
from zimage.views.format import damaged_lines

st.set_page_config(page_title="Runs", page_icon="📈", layout="wide")
keep_user_name(st.session_state)
settings = get_settings().ensure()
jobs.ensure_scheduler(settings)
ss = st.session_state
actor = page_actor(st, settings)  # password/oidc: the sign-in form until someone is signed in
st.title("Runs")


@st.fragment(run_every=rv.TABLE_REFRESH_S)
def runs_table(reg, filters: dict, listed: frozenset) -> None:
    """The runs table, refreshed by itself (one registry query per tick). When a run joins or leaves the
    filtered list (started, re-queued, resumed, deleted), the page redraws once so the picker has it too."""
    with shown_errors(st.error):
        runs = registry.list_runs(reg, **filters, limit=1000)
        if frozenset(runs["run_id"]) != listed:
            st.rerun(scope="app")
        st.dataframe(
            rv.runs_table(runs), hide_index=True, key="runs_table", height=min(400, 38 + 35 * max(1, len(runs))),
            column_config={"progress": st.column_config.ProgressColumn("progress", format="%.0f%%", min_value=0, max_value=100)},
        )  # fmt: skip


def pick_run(reg) -> tuple[str, dict | None]:
    """Filters, the table of runs and the picker; the picked run follows the `?run=` link."""
    choices = registry.filter_choices(reg)
    f1, f2, f3, f4, f5 = st.columns([2, 2, 2, 2, 3])
    states = f1.multiselect("State", choices["state"], key="runs_state", persist_state="session", bind="query-params")
    users = f2.multiselect("User", choices["user"], key="runs_user", persist_state="session", bind="query-params")
    datasets = f3.multiselect(
        "Dataset", choices["dataset"], key="runs_dataset", persist_state="session", bind="query-params"
    )
    kinds = f4.multiselect(
        "Kind",
        choices["kind"],
        default=[k for k in ("train",) if k in choices["kind"]],
        key="runs_kind",
        persist_state="session",
        bind="query-params",
    )
    text = f5.text_input(
        "Search",
        key="runs_search",
        persist_state="session",
        bind="query-params",
        placeholder="name, run id, user, dataset…",
    )
    for line in damaged_lines(registry.damaged_runs(reg)):  # whatever the filters: a damaged run never hides
        st.warning(line)
    filters = dict(state=states, user=users, dataset=datasets, kind=kinds, text=text)
    runs = registry.list_runs(reg, **filters, limit=1000)
    runs_table(reg, filters, frozenset(runs["run_id"]))
    if runs.empty:
        st.info("No runs match. Start one on the Train page.")
        st.stop()

    labels = {r["run_id"]: rv.run_label(r) for r in runs.to_dict("records")}
    wanted = st.query_params.get("run")
    if wanted and wanted not in labels and registry.run_detail(reg, wanted) is not None:
        labels = {wanted: wanted, **labels}  # a run outside the filters, opened by link
    if wanted in labels and ss.get("runs_linked") != wanted:  # a link (or a reload) names a run: open it
        ss["runs_pick"] = ss["runs_linked"] = wanted
    elif ss.get("runs_pick") not in labels:
        ss["runs_pick"] = next(iter(labels))
    run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="runs_pick", persist_state="session")
    st.query_params["run"] = run_id
    return run_id, registry.run_detail(reg, run_id)


picked = None
with shown_errors(st.error):
    reg = open_registry(settings)
    picked = pick_run(reg)
if picked is None:
    st.stop()
run_id, first = picked
was_live = first is not None and not rv.is_final(first["state"])


def show_run() -> None:
    """One run: header, progress, controls, charts, samples, checkpoints, log."""
    d = registry.run_detail(reg, run_id)
    if d is None:
        st.warning(f"Run {run_id} is gone (deleted).")
        return
    if was_live and rv.is_final(d["state"]):
        st.rerun()  # finished just now: redraw the page once, without the timer
    st.subheader(f"{d.get('name') or run_id} · {d['state']}")
    st.caption(f"{run_id} · user {d.get('user_name')} · dataset {d.get('dataset')} · model {d.get('model')}")
    numbers = registry.run_numbers(reg, run_id)
    if summary := rv.val_summary(numbers):
        st.caption(summary)
    frac, line = rv.progress_line(d)
    st.progress(frac, text=line)
    if warning := rv.silence_warning(d):
        st.warning(warning)
    if d.get("problem"):
        st.error(f"Damaged: {d['problem']}")
    if d.get("error"):
        st.error((str(d["error"]).strip().splitlines() or [""])[-1])
    allowed = rv.action_states(d["state"])
    start_from = None
    if rv.is_final(d["state"]) and allowed["resume"]:  # back in line: from which checkpoint
        choices = rv.resume_choices(registry.checkpoints(reg, run_id))
        picked_ckpt = st.selectbox("Resume from", choices, key="run_resume_from")
        start_from = None if picked_ckpt == choices[0] else picked_ckpt
    may, why = control_state(actor, "control", d.get("user_name"), f"run {run_id}")
    if not may:
        st.caption(f"Controls are off: {why}")
    cols = st.columns(len(allowed) + 1)
    for col, (action, label) in zip(cols, rv.ACTIONS.items(), strict=False):
        if col.button(label, key=f"run_{action}", disabled=not (allowed[action] and may), help=why):
            try:
                done = jobs.control(settings, run_id, action, user=ss.get("user_name"), actor=actor,
                                    checkpoint=start_from if action == "resume" else None)  # fmt: skip
                st.toast(f"{run_id}: {done}")
            except UserError as exc:
                st.error(str(exc))
    lora = rv.lora_file(d)
    cols[-1].download_button("Download LoRA", rv.file_reader(lora) if lora else b"", file_name=lora.name if lora else "lora.safetensors",
                             disabled=lora is None, on_click="ignore", key="run_download")  # fmt: skip

    c1, c2 = st.columns([3, 1])
    smoothing = c2.slider("Smoothing (EMA)", 0.0, 0.99, 0.6, 0.01, key="run_smoothing", persist_state="session")
    log_y = c2.toggle("Log scale", key="run_log", persist_state="session")
    figures = rv.run_chart_specs(registry.metric_series(reg, run_id, rv.RUN_METRICS, max_points=400), smoothing, log_y)
    if figures["Loss"] is None:
        c1.info("No metrics yet: they appear with the first training step.")
    else:
        val_chart = figures.pop("Validation loss")
        loss_col, val_col = c1.columns(2) if val_chart is not None else (c1, None)
        loss_col.caption("Loss")
        loss_col.vega_lite_chart(spec=figures.pop("Loss"), key="run_chart_loss")
        if val_col is not None:
            val_col.caption("Validation loss (fixed images, noise and sigmas)")
            val_col.vega_lite_chart(spec=val_chart, key="run_chart_val_loss")
        for col, (title, chart) in zip(st.columns(3), figures.items(), strict=True):
            col.caption(title)
            if chart is not None:
                col.vega_lite_chart(spec=chart, key=f"run_chart_{title}")

    steps = registry.sample_steps(reg, run_id)
    if steps:
        st.subheader("Samples")
        step = st.select_slider("Step", steps, value=steps[-1], key="run_sample_step") if len(steps) > 1 else steps[0]
        tiles = rv.sample_tiles(settings, registry.samples(reg, run_id, step=step), step)
        for col, (thumb, caption) in zip(st.columns(max(1, min(4, len(tiles)))), tiles, strict=False):
            col.image(thumb, caption=caption)
    ckpts = registry.checkpoints(reg, run_id)
    if not ckpts.empty:
        st.subheader("Checkpoints")
        st.dataframe(rv.checkpoint_rows(ckpts), hide_index=True, key="run_checkpoints")
        if best := rv.best_checkpoint_lora(ckpts, numbers):
            st.download_button(f"Download the best checkpoint (step {best[1]}, lowest val_loss)", rv.file_reader(best[0]),
                               file_name=f"{d.get('output_name') or run_id}-step{best[1]}.safetensors",
                               on_click="ignore", key="run_download_best")  # fmt: skip
    with st.expander("Log", expanded=d["state"] in ("failed", "lost")):
        st.code(rv.log_tail(d["run_dir"]) or "(no log yet)", language=None)
    with st.expander("Timeline: who did what to this run"):
        timeline = events_rows(run_timeline(reg, run_id))
        st.dataframe(timeline, hide_index=True, key="run_timeline") if timeline else st.caption("Nothing recorded yet.")


@st.fragment(run_every=2 if was_live else None)
def live() -> None:
    """The run's live part: refreshed every 2 s while it runs, without rerunning the whole page."""
    with shown_errors(st.error):
        show_run()


live()
left, right = st.columns(2)
with left:
    page_link(st, "pages/3_Train.py", "Clone these settings on the Train page", {"clone": run_id})
with right:
    page_link(st, "pages/5_Compare.py", "Compare with other runs", {"runs": run_id})
