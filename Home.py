"""Home: the machine (GPUs or CPU only, disk), the queue and active runs, recent LoRAs, models and datasets."""

import streamlit as st

from zimage import jobs, registry
from zimage.catalogue import list_models
from zimage.data.manage import dataset_rows
from zimage.jobs.backends import health as backend_health
from zimage.runfolder import ACTIVE_STATES
from zimage.settings import get_settings
from zimage.system import disk_usage, gpu_report
from zimage.views import home, keep_user_name, open_registry, page_link, shown_errors
from zimage.views.auth import page_actor, show_activity
from zimage.views.format import damaged_lines

st.set_page_config(page_title="Z-Image LoRA Studio", page_icon="🎨", layout="wide")
keep_user_name(st.session_state)
settings = get_settings().ensure()
jobs.ensure_scheduler(settings)  # ingest run folders and start queued jobs while the app runs

actor = page_actor(st, settings)  # password/oidc: the sign-in form until someone is signed in
st.title("Z-Image LoRA Studio")
st.caption(f"Data home: `{settings.home}`")
with shown_errors(st.warning):
    show_activity(st, settings, actor)  # the no-login banner; the admins' record of every action

st.subheader("Machine")


@st.fragment(run_every=5)
def machine() -> None:
    """Each GPU (NVML: no CUDA context in the app) with the job holding it, its memory and utilisation."""
    report = gpu_report()
    if not report.gpus:
        st.info(home.no_gpu_text(report))
        return
    active = None  # the GPUs are listed even when the registry cannot say which job holds them
    with shown_errors(st.warning):
        active = registry.list_runs(open_registry(settings), state=list(ACTIVE_STATES), limit=100)
    st.dataframe(home.gpu_rows(report.gpus, active), hide_index=True, key="home_gpus")


machine()
for col, (label, size) in zip(st.columns(5), home.disk_rows(disk_usage(settings)), strict=False):
    col.metric(f"Disk: {label.lower()}" if label != "Free" else "Disk: free", size)


@st.fragment(run_every=3)
def live() -> None:
    """Queue and active runs, refreshed without rerunning the page."""
    st.subheader("Queue")
    name, health = backend_health(settings)  # where queued jobs go, and whether it answers (cached, bounded)
    ok, text = home.launcher_line(name, health)
    (st.caption if ok else st.warning)(text)
    with shown_errors(st.warning):
        reg = open_registry(settings)
        waiting = registry.queue(reg)
        if waiting.empty:
            st.caption("Nothing queued or running.")
        else:
            rows = home.queue_rows(waiting, name)
            for other in home.other_launchers(rows, name):  # jobs that named another launcher: is it there?
                ok, text = home.launcher_line(other, backend_health(settings, other, wait=1.0)[1], also=True)
                (st.caption if ok else st.warning)(text)
            st.dataframe(rows, hide_index=True, key="home_queue")
            if limit := settings.home_settings().scheduler.user_limit:  # the `waiting` column names it too
                st.caption(f"At most {limit} active runs per user (settings.toml `[scheduler] user_limit`).")
        for line in damaged_lines(registry.damaged_runs(reg, limit=10)):
            st.warning(line)
        active = registry.list_runs(reg, state=list(ACTIVE_STATES), limit=20)
        if not active.empty:
            st.subheader("Active runs")
            for run_id, frac, text in home.active_progress(active):
                st.progress(frac, text=text)
                st.page_link("pages/4_Runs.py", label=f"Open {run_id}", query_params={"run": run_id})


live()

st.subheader("Recent LoRAs")
loras = home.recent_loras(settings)
if loras:
    st.dataframe(loras, hide_index=True, key="home_loras", column_config={"path": None})
else:
    st.caption("No trained LoRA yet: start one on the Train page.")
page_link(st, "pages/6_LoRAs.py", "All LoRAs and fine-tunes: details, merge, push, delete", {})

st.subheader("Base models")
models = list_models(settings)
st.dataframe(
    [
        {
            "name": m.entry.name,
            "model": m.entry.title,
            "type": m.entry.model_type,
            "sampling": f"{m.entry.sample_steps} steps, CFG {m.entry.sample_cfg:g}",
            "status": "ready" if m.path else (m.problem or "not downloaded"),
            "source": m.entry.repo_id or "local",
        }
        for m in models
    ],
    hide_index=True,
    key="home_models",
)
if not any(m.path for m in models):
    st.info("No model is on disk yet. Run `zimage demo` for the offline tiny model, or `zimage models download NAME`.")

st.subheader("Datasets")
rows = dataset_rows(settings)  # a damaged dataset is listed as `damaged` with its reason
if rows:
    columns = ["name", "type", "trigger word", "images", "captioned", "resolution"]
    st.dataframe([{k: r[k] for k in columns} for r in rows], hide_index=True, key="home_datasets")
    for r in rows:
        if r["problem"]:
            st.warning(r["problem"])
else:
    st.info("No datasets yet. Run `zimage demo` for the demo-shapes dataset.")
