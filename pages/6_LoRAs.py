"""LoRAs: every LoRA and fine-tune in the home — details, samples, download, test grid, merge, push, delete."""

import streamlit as st

from zimage import jobs
from zimage.loras.library import list_items
from zimage.settings import get_settings
from zimage.users import current_user
from zimage.views import keep_user_name, shown_errors
from zimage.views import loras as lv
from zimage.views.auth import control_state, page_actor
from zimage.views.runs import file_reader

st.set_page_config(page_title="LoRAs", page_icon="🧩", layout="wide")
keep_user_name(st.session_state)
settings = get_settings().ensure()
jobs.ensure_scheduler(settings)
ss = st.session_state
st.title("LoRAs")
actor = page_actor(st, settings)  # password/oidc: the sign-in form until someone is signed in
login = st.user.to_dict()
if actor.mode == "none" and not login.get("is_logged_in"):
    st.sidebar.text_input("Your name (recorded on the jobs you start)", key="user_name")


def user() -> str | None:
    return current_user(login, ss.get("user_name"))


def details(item) -> None:
    """One item: fields, last samples, download, and what can be done with it."""
    what = f"{'LoRA' if item.kind == 'lora' else 'fine-tune'} {item.name}"
    (may_push, why_push), (may_delete, why_delete) = (
        control_state(actor, v, item.owner, what) for v in ("upload", "delete")
    )
    st.dataframe(lv.detail_rows(item), hide_index=True, key="loras_detail")
    tiles = lv.sample_tiles(settings, item)
    if tiles:
        st.caption("Last samples of its run")
        for col, (thumb, caption) in zip(st.columns(min(4, len(tiles))), tiles, strict=False):
            col.image(thumb, caption=caption)
    if item.kind == "lora":
        st.download_button("Download", file_reader(item.path), file_name=item.path.name, key="loras_download")
    else:
        st.caption(
            f"Fine-tune folder: `{item.path}` (export it for ComfyUI with `zimage finetunes export {item.name} --comfy`)"
        )

    if item.kind == "lora" and not item.damaged:
        with st.expander("Test with prompts"), st.form("loras_test_form"):
            model = st.text_input("Base model", lv.grid_model(item), key="loras_test_model")
            prompt = st.text_input("Prompt", lv.default_prompt(item), key="loras_test_prompt")
            c1, c2, c3 = st.columns(3)
            strengths = c1.text_input("Strengths", "0, 0.5, 1", key="loras_test_strengths")
            seed = c2.number_input("Seed", 0, 2**31 - 1, 42, key="loras_test_seed")
            size = c3.number_input("Size", 64, 2048, 512, 16, key="loras_test_size")
            if st.form_submit_button("Render test grid", key="loras_test_go"):
                with shown_errors(st.error):
                    run_id = lv.queue_test(
                        settings, item, model, prompt, strengths, int(seed), int(size), user(), actor=actor
                    )
                    st.success(f"Queued test grid {run_id}; it shows on the Compare page when it renders.")
        with st.expander("Push to the Hugging Face Hub"), st.form("loras_push_form"):
            repo = st.text_input("Repository (user/name)", key="loras_push_repo")
            private = st.checkbox("Private", value=True, key="loras_push_private")
            if st.form_submit_button("Push", key="loras_push_go", disabled=not may_push, help=why_push):
                with shown_errors(st.error):
                    from zimage.loras.hub import push_lora

                    plan = push_lora(settings, item.name, repo, private=private, user=user(), actor=actor)
                    st.success(f"Uploaded {', '.join(sorted(plan.files))} to {plan.repo_id}.")

    if ss.get("loras_confirm") == item.name:
        st.warning(f"Delete {item.path}? This cannot be undone.")
        y, n = st.columns(2)
        if y.button("Yes, delete", key="loras_delete_yes", type="primary"):
            with shown_errors(st.error):
                from zimage.loras.library import delete_item

                gone = delete_item(settings, item.name, user(), kind=item.kind, actor=actor)
                ss.pop("loras_confirm", None)
                ss["loras_deleted"] = f"Deleted {gone.path.name}."
                st.rerun()
        if n.button("Cancel", key="loras_delete_no"):
            ss.pop("loras_confirm", None)
            st.rerun()
    elif st.button("Delete…", key="loras_delete", disabled=not may_delete, help=why_delete):
        ss["loras_confirm"] = item.name
        st.rerun()


def merge_form(items) -> None:
    loras = {i.name: i for i in items if i.kind == "lora" and not i.damaged}
    if len(loras) < 2:
        st.caption("Merging needs two LoRAs or more.")
        return
    with st.form("loras_merge_form"):
        chosen = st.multiselect("LoRAs", list(loras), key="loras_merge_pick")
        weights = st.text_input("Weights (one per LoRA, in order)", "1.0, 1.0", key="loras_merge_weights")
        output = st.text_input("Output name", key="loras_merge_name")
        c1, c2 = st.columns(2)
        mode = c1.radio("How", ["exact", "svd", "model"], key="loras_merge_mode", horizontal=True,
                        format_func={"exact": "exact (ranks added)", "svd": "smaller rank (SVD)",
                                     "model": "into the model (a fine-tune)"}.get)  # fmt: skip
        rank = c2.number_input("Rank (SVD)", 1, 1024, 16, key="loras_merge_rank")
        if st.form_submit_button("Merge", key="loras_merge_go"):
            with shown_errors(st.error):
                st.success(
                    lv.merge(settings, [loras[n] for n in chosen], weights, output, mode, int(rank), actor=actor)
                )


with shown_errors(st.error):
    if "loras_deleted" in ss:
        st.success(ss.pop("loras_deleted"))
    items = list_items(settings)
    for line in lv.damaged_lines(items):
        st.warning(line)
    if not items:
        st.info(
            f"No LoRAs yet. Train one on the Train page, or copy .safetensors files into {settings.models_dir / 'loras'}."
        )
        st.stop()
    st.dataframe(lv.table_rows(items), hide_index=True, key="loras_table")
    by_key = {lv.item_key(i): i for i in items}
    wanted = st.query_params.get("lora")
    if ss.get("loras_pick") not in by_key:
        ss["loras_pick"] = wanted if wanted in by_key else next(iter(by_key))
    key = st.selectbox("LoRA", list(by_key), key="loras_pick", format_func=lambda k: lv.item_label(by_key[k]))
    st.query_params["lora"] = key
    details(by_key[key])
    st.subheader("Merge")
    merge_form(items)
