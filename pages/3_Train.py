"""Train: every setting in groups, presets, model-aware defaults, memory estimate, checks, launch, clone/resume."""

import pandas as pd
import streamlit as st

from zimage import jobs, registry
from zimage.errors import UserError
from zimage.settings import get_settings
from zimage.system import gpus
from zimage.users import current_user
from zimage.views import charts, keep_user_name, open_registry, page_link, presets, shown_errors
from zimage.views import launch as lv
from zimage.views import train_form as tf
from zimage.views.auth import page_actor
from zimage.views.memory import memory_view
from zimage.views.runs import run_label

st.set_page_config(page_title="Train", page_icon="🏋️", layout="wide")
keep_user_name(st.session_state)
settings = get_settings().ensure()
jobs.ensure_scheduler(settings)
ss = st.session_state
st.title("Train")
actor = page_actor(st, settings)  # password/oidc: the sign-in form until someone is signed in
login = st.user.to_dict()
if actor.mode == "none" and not login.get("is_logged_in"):
    st.sidebar.text_input("Your name (recorded on the runs you start)", key="user_name")

try:
    reg = open_registry(settings)
    earlier = registry.list_runs(reg, kind="train", limit=300)
except UserError as exc:
    st.warning(str(exc))
    reg, earlier = None, pd.DataFrame(columns=["run_id", "state", "output_name"])
busy = lv.busy_outputs(earlier)


def act(job, *args) -> None:
    """A button's job, run in its callback; its message (or why it was refused) shows at the top."""
    try:
        message = job(*args)
        if message:
            ss["tr_msg"] = ("success", message)
    except UserError as exc:
        ss["tr_msg"] = ("error", str(exc))


def use_preset() -> None:
    tf.apply_values(ss, presets.preset_values(settings, ss["tr_preset"], tf.read_values(ss), busy))


def clone(run_id: str) -> str:
    tf.apply_values(ss, presets.run_values(settings, registry.run_detail(reg, run_id)["config"], busy))
    return f"Settings of {run_id} loaded; change what you like and launch."


def resume(run_id: str) -> str:
    return f"{run_id}: {jobs.control(settings, run_id, 'resume', user=ss.get('user_name'), actor=actor)}."


def launch() -> str:
    user = current_user(login, ss.get("user_name"))
    run_id, position, following = lv.launch_run(settings, tf.read_values(ss), user, busy, actor=actor,
                                                 gpus=int(ss.get("tr_gpus") or 1),
                                                 priority=ss.get("tr_priority"), backend=ss.get("tr_backend"))  # fmt: skip
    ss[tf.KEY + "output_name"], ss["tr_launched"] = following, run_id
    return lv.position_text(run_id, position)


def save_preset() -> str:
    name, replace = ss.get("tr_preset_name", "").strip(), ss.get("tr_preset_replace", False)
    return f"Preset saved: {presets.save_preset(settings, name, tf.read_values(ss), overwrite=replace).name}"


if tf.EXTRA_KEY not in ss:  # first visit: the linked preset and dataset (?tr_preset=&tr_dataset_path=) or the first
    ss.update(tf.linked_choices(settings, st.query_params.to_dict(), presets.preset_names(settings)))
    act(use_preset)
clone_id = st.query_params.get("clone")
if clone_id and ss.get("tr_cloned") != clone_id and reg is not None and clone_id in set(earlier["run_id"]):
    ss["tr_cloned"] = clone_id
    act(clone, clone_id)

top = st.columns([2, 3, 1, 1], vertical_alignment="bottom")
top[0].selectbox("Preset", presets.preset_names(settings), format_func=presets.preset_label, key="tr_preset",
                 on_change=act, args=(use_preset,), persist_state="session", bind="query-params")  # fmt: skip
labels = {r["run_id"]: run_label(r) for r in earlier.to_dict("records")}
pick = top[1].selectbox("Earlier run", list(labels), format_func=labels.get, index=None, key="tr_earlier",
                        placeholder="Clone or resume an earlier run")  # fmt: skip
pick_state = earlier.set_index("run_id")["state"].get(pick) if pick else None
top[2].button("Clone", key="tr_clone", disabled=not pick, on_click=act, args=(clone, pick))
top[3].button("Resume", key="tr_resume", disabled=pick_state not in ("stopped", "failed", "lost"),
              on_click=act, args=(resume, pick), help="Put a stopped, failed or lost run back in line")  # fmt: skip
if "tr_msg" in ss:
    kind, text = ss.pop("tr_msg")
    getattr(st, kind)(text)
    if kind == "success" and ss.get("tr_launched"):
        page_link(st, "pages/4_Runs.py", "Watch it on the Runs page", {"run": ss["tr_launched"]})

values = tf.read_values(ss)
problems, resolved = tf.check(values, settings, busy)
entries = tf.model_entries(settings)
FORMAT = {"model_path": lambda n: tf.model_label(n, entries), "model_type": lambda t: tf.MODEL_TYPE_LABELS.get(t, t)}
CALLBACKS = {"model_path": tf.on_model_change, "model_type": tf.on_model_type_change}


def widget(f: tf.FormField, where) -> None:
    """One field's widget (its value lives in session_state) and its problems right under it."""
    cb = CALLBACKS.get(f.name)
    kw = dict(
        key=tf.KEY + f.name,
        help=f.help or None,
        on_change=cb,
        args=(ss, settings) if cb else None,
        persist_state="session",
        bind="query-params" if f.name in tf.URL_FIELDS else None,
    )
    if f.kind == "select":
        where.selectbox(f.label, f.options, format_func=FORMAT.get(f.name, str), **kw)
    elif f.kind == "multi":
        where.multiselect(f.label, f.options, **kw)
    elif f.kind == "bool":
        where.checkbox(f.label, **kw)
    elif f.kind in ("text", "area"):
        (where.text_area if f.kind == "area" else where.text_input)(f.label, **kw)
    else:
        where.number_input(f.label, step=int(f.step) if f.kind == "int" else f.step, format=f.fmt, **kw)
    for message in problems.get(f.name, []):
        where.error(message)


form_col, side = st.columns([3, 2], gap="large")
groups = tf.by_group(tf.fields(settings, values))
with form_col:
    for group, title in tf.GROUPS.items():
        bad = any(f.name in problems for f in groups[group])
        with st.expander(title + (" ⚠" if bad else ""), expanded=group == "basic" or bad):
            cols = st.columns(2)
            for i, f in enumerate(groups[group]):
                widget(f, cols[i % 2])

with side:
    st.subheader("Memory estimate")
    with shown_errors(lambda msg: st.caption(f"No estimate until the settings are valid ({msg.splitlines()[0]})")):
        view = memory_view(tf.config_from_values(values), settings, gpus())
        st.metric("Estimated peak", f"{view.peak_gib:.2f} GiB", help=f"during {view.peak_phase}; the card needs "
                  f"about {view.device_gib:.1f} GiB with the CUDA context")  # fmt: skip
        st.altair_chart(charts.memory_chart(view.rows), key="tr_memory_chart")
        (st.success if view.fits else st.warning if view.fits is False else st.info)(view.fit)
        for tip in view.tips:
            st.caption(f"To use less: {tip}")
    st.subheader("Launch")
    if problems:
        st.error(f"{sum(map(len, problems.values()))} setting(s) need attention before launch (marked in red).")
        for message in tf.unplaced(problems):
            st.error(message)
    if (most_gpus := lv.gpus_offered(settings)) > 1:  # data parallel: one torchrun rank per GPU
        st.number_input("GPUs for this run", min_value=1, max_value=most_gpus, value=1, key="tr_gpus",
                        help="Data parallel: one process per GPU, each a batch; the images/step multiply")  # fmt: skip
    prio = lv.default_priority(settings)
    st.selectbox("Priority", lv.PRIORITIES, index=lv.PRIORITIES.index(prio), key="tr_priority",
                 help="Queued high jobs start before normal ones, normal before low")  # fmt: skip
    if len(offered := lv.backends_offered(settings)) > 1:  # a cluster launcher is set up for this home
        st.selectbox("Run on", offered, key="tr_backend", help="Where the job runs: this host (local), or the "
                     "cluster launcher in settings.toml; the queue, priorities and limits are the studio's")  # fmt: skip
    st.button("Launch", type="primary", key="tr_launch", disabled=bool(problems), on_click=act, args=(launch,))
    with st.expander("Save as preset"):
        st.text_input("Preset name", key="tr_preset_name", persist_state="session")
        st.checkbox("Replace a saved preset of that name", key="tr_preset_replace")
        st.button("Save preset", key="tr_preset_save", on_click=act, args=(save_preset,))
