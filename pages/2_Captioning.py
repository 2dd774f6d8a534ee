"""Captioning: caption a dataset with BLIP or Florence-2 as a background job, and watch it run."""

import streamlit as st

from zimage import jobs
from zimage.captioning.models import captioner_choices, captioner_rows, check_captioner, known_captioner
from zimage.captioning.worker import caption_config, caption_runs
from zimage.data.manage import dataset_rows
from zimage.errors import UserError
from zimage.settings import get_settings
from zimage.users import current_user
from zimage.views import keep_user_name
from zimage.views.auth import page_actor

st.set_page_config(page_title="Captioning", page_icon="📝", layout="wide")
keep_user_name(st.session_state)
settings = get_settings().ensure()
jobs.ensure_scheduler(settings)  # queued jobs start even when nobody opened Home in this server process
ss = st.session_state
st.title("Captioning")

actor = page_actor(st, settings)  # password/oidc: the sign-in form until someone is signed in
login = st.user.to_dict()
if actor.mode == "none" and not login.get("is_logged_in"):
    st.sidebar.text_input("Your name (recorded on the jobs you start)", key="user_name")

rows = {r["name"]: r for r in dataset_rows(settings)}
if not rows:
    st.info("No datasets yet: create one on the Datasets page first.")
    st.stop()
name = st.selectbox("Dataset", list(rows), key="dataset", bind="query-params", persist_state="session")
row = rows[name]
st.caption(f"{row['images']} images, {row['captioned']} captioned, trigger word: {row['trigger word'] or '(none)'}")

with st.expander("Captioning models"):
    st.dataframe(captioner_rows(settings), hide_index=True, key="cap_models")
labels = captioner_choices(settings) | {"other": "Other: hub id or model folder"}  # the demo's tiny BLIP too
choices, ready = list(labels), [r["name"] for r in captioner_rows(settings) if r["status"].startswith("ready")]
choice = st.selectbox("Model", choices, choices.index(ready[0]) if ready else 0, format_func=labels.get,
                      key="cap_model", persist_state="session")  # fmt: skip
model = (
    st.text_input("Hub id or folder", key="cap_model_custom", persist_state="session").strip()
    if choice == "other"
    else choice
)
entry = known_captioner(model) if model else None
c1, c2 = st.columns(2)
detail = c1.radio("Detail", ["short", "detailed", "paragraph"], horizontal=True, key="cap_detail", persist_state="session",
                  help="Florence-2 has a task per level; BLIP writes one sentence (longer with more detail).")  # fmt: skip
mode = c2.radio("Images", ["missing", "all"], horizontal=True, key="cap_mode", persist_state="session",
                format_func={"missing": "Only those without a caption", "all": "All (overwrite captions)"}.get)  # fmt: skip
trigger = st.checkbox(f"Start each caption with the trigger word ({row['trigger word'] or 'none set'})", True,
                      key="cap_trigger", persist_state="session", disabled=not row["trigger word"])  # fmt: skip
prompt = st.text_input("BLIP prompt (optional): words each caption starts with", key="cap_prompt", persist_state="session") if (
    entry is None or entry.family == "blip") else ""  # fmt: skip
with st.expander("Advanced"):
    a1, a2, a3 = st.columns(3)
    batch = a1.number_input("Batch size", 1, 64, 4, key="cap_batch", persist_state="session")
    beams = a2.number_input("Beams", 1, 16, 3, key="cap_beams", persist_state="session")
    max_tokens = a3.number_input(
        "Max new tokens (0: by detail)", 0, 1024, 0, key="cap_max_tokens", persist_state="session"
    )
    download = st.checkbox(
        "Download the model if it is not here yet", True, key="cap_download", persist_state="session"
    )

if st.button("Start captioning", type="primary", key="cap_start"):
    try:
        user = current_user(login, ss.get("user_name"))
        if not user:
            raise UserError("Your name: type it in the sidebar first, so the team knows whose job this is.")
        config = caption_config(
            dataset=name, model=check_captioner(model, settings, download), detail=detail, mode=mode, trigger_prefix=trigger, prompt=prompt,
            batch_size=int(batch), num_beams=int(beams), max_new_tokens=int(max_tokens) or None, download=download,
        )  # fmt: skip
        run_id = jobs.enqueue(settings, "caption", config, user=user, name=f"caption-{name}", actor=actor)
        st.success(f"Queued captioning job {run_id}; progress below. Review the captions on the Datasets page.")
    except UserError as exc:
        st.error(str(exc))


@st.fragment(run_every=2)
def show_runs() -> None:
    st.subheader("Captioning jobs")
    runs = caption_runs(settings, limit=5)
    if not runs:
        st.caption("No captioning jobs yet.")
    for run in runs:
        status, config = run["status"], run["config"]
        total, step = status.get("total_steps") or 0, status.get("step") or 0
        state = status.get("state", "?")
        st.progress(step / total if total else 0.0,
                    text=f"{run['run_id']} · {config.get('dataset')} · {config.get('model')} · {state} · "
                         f"{step}/{total} images · {status.get('error_count') or 0} errors")  # fmt: skip
        if status.get("current_file") and state == "running":
            st.caption(f"now: {status['current_file']}")
        if status.get("error"):
            st.error(status["error"])
        if status.get("errors"):
            st.dataframe(status["errors"], hide_index=True, key=f"errors_{run['run_id']}")
        if state in ("queued", "starting", "running", "paused") and st.button("Stop", key=f"stop_{run['run_id']}"):
            try:
                st.info(jobs.control(settings, run["run_id"], "stop", actor=actor))
            except UserError as exc:
                st.error(str(exc))


show_runs()
