"""Datasets: create and configure datasets, upload images, edit captions, check before training."""

import streamlit as st
from streamlit_image_select import image_select

from zimage.data import caption_undo, manage, report, stats, thumbnails, uploads
from zimage.data.folders import DATASET_TYPES, DatasetInfo
from zimage.data.ownership import dataset_owner
from zimage.errors import UserError
from zimage.settings import get_settings
from zimage.views import datasets as dv
from zimage.views import keep_user_name, shown_errors
from zimage.views.auth import control_state, page_actor

st.set_page_config(page_title="Datasets", page_icon="🗂️", layout="wide")
keep_user_name(st.session_state)
settings = get_settings().ensure()
ss = st.session_state
actor = page_actor(st, settings)  # password/oidc: the sign-in form until someone is signed in
st.title("Datasets")
BULK_PREVIEW_ROWS = 10  # the bulk-edit preview shows this many of the captions that would change


def settings_fields(prefix: str, info: DatasetInfo) -> dict:
    """The dataset.json fields as widgets (the create form and the settings tab share them)."""
    c1, c2, c3 = st.columns(3)
    return {
        "type": c1.selectbox(
            "Type", DATASET_TYPES, DATASET_TYPES.index(info.type), key=f"{prefix}_type", persist_state="session"
        ),
        "trigger_word": c2.text_input(
            "Trigger word", info.trigger_word, key=f"{prefix}_trigger", persist_state="session"
        ),
        "resolution": c3.number_input(
            "Resolution", 64, 4096, info.resolution, 64, key=f"{prefix}_res", persist_state="session"
        ),
        "caption_prefix": c1.text_input(
            "Caption prefix", info.caption_prefix, key=f"{prefix}_prefix", persist_state="session"
        ),
        "caption_suffix": c2.text_input(
            "Caption suffix", info.caption_suffix, key=f"{prefix}_suffix", persist_state="session"
        ),
        "description": st.text_area("Description", info.description, key=f"{prefix}_desc", persist_state="session"),
    }


with st.expander("Create a dataset", expanded=not manage.dataset_rows(settings)), st.form("new_form"):
    new_name = st.text_input("Name (lowercase letters, digits, - and _)", key="new_name", persist_state="session")
    fields = settings_fields("new", DatasetInfo(name=""))
    if st.form_submit_button("Create dataset", key="new_submit"):
        try:
            manage.create_dataset(settings, new_name, actor=actor, **fields)
            ss["dataset"] = new_name
            st.success(f"Created dataset {new_name}.")
        except UserError as exc:
            st.error(str(exc))

rows = manage.dataset_rows(settings)  # after the form, so a dataset created just now is listed
if rows:
    st.dataframe(rows, hide_index=True, key="ds_table")
names = [r["name"] for r in rows]
if not names:
    st.info("No datasets yet: create one above (or run `zimage demo` for the demo-shapes dataset).")
    st.stop()
name = st.selectbox("Dataset", names, key="dataset", bind="query-params", persist_state="session")
folder = manage.open_dataset(settings, name)
if problem := folder.problem():  # a damaged dataset.json: say which field, touch nothing
    st.error(f"{problem}. Fix or replace {folder.info_path}; the other datasets work as usual.")
    st.stop()
info = folder.read_info()
# Who may change this dataset (its owner or an admin; the library refuses the rest all the same)
owner = dataset_owner(folder)
(may_edit, why_edit), (may_add, why_add), (may_delete, why_delete) = (
    control_state(actor, verb, owner, f"dataset {name}") for verb in ("edit", "upload", "delete"))  # fmt: skip
if not may_edit:
    st.caption(f"Changes are off: {why_edit}")
t_images, t_upload, t_bulk, t_stats, t_check, t_settings = st.tabs(
    ["Images & captions", "Upload", "Bulk edit", "Statistics", "Check", "Settings"]
)

with t_images:
    items = [i.image.name for i in folder.items()]
    if not items:
        st.info("No images yet: add some on the Upload tab.")
    else:
        page = st.number_input("Page", 1, max(1, -(-len(items) // 24)), 1, key="gallery_page", persist_state="session")
        tiles, _pages = thumbnails.gallery_page(folder, page)
        pick_names, gallery_key = [n for n, _ in tiles], f"gallery_{name}_{page}"
        shown = pick_names.index(ss["image_pick"]) if ss.get("image_pick") in pick_names else 0
        # Fixed square cells, so each letterboxed square tile shows whole (the component crops to fill a cell).
        clicked = image_select("Pick an image", [t for _, t in tiles], pick_names, shown, return_value="index",
                               use_container_width=False, key=gallery_key)  # fmt: skip
        last = ss.setdefault("gallery_last", {})
        ss["image_pick"] = thumbnails.picked_image(pick_names, clicked, last.get(gallery_key), ss.get("image_pick"))
        last[gallery_key] = clicked
        pick = st.selectbox("Image", pick_names, key="image_pick")
        item = manage.find_item(folder, pick)
        left, right = st.columns([1, 2])
        left.image(str(thumbnails.thumbnail(folder, item.image, 512) or thumbnails.placeholder()))
        version = item.caption_path.stat().st_mtime_ns if item.caption_path.exists() else 0  # fresh after edits
        text = right.text_area("Caption", item.caption or "", height=150, key=f"caption_{name}_{pick}_{version}")
        if right.button("Save caption", key="caption_save", disabled=not may_edit, help=why_edit):
            manage.write_caption(folder, pick, text, actor=actor)
            right.success(f"Saved the caption of {pick}.")
        # The confirmation is per image, so it never carries over to the image shown after a delete.
        if right.checkbox("Yes, delete this image", key=f"delete_one_confirm_{pick}", disabled=not may_delete,
                          help=why_delete) and right.button("Delete image", key="delete_one"):  # fmt: skip
            manage.delete_images(folder, [pick], actor=actor)
            ss.pop("image_pick", None)
            st.rerun()

with t_upload:
    kind = st.radio(
        "Upload",
        ["Images, captions (.txt) or a zip", "A folder"],
        horizontal=True,
        key="upload_kind",
        persist_state="session",
    )
    files = st.file_uploader(
        "Files", type=list(uploads.UPLOAD_TYPES), key=f"uploader_{ss.get('upload_round', 0)}",
        accept_multiple_files=True if kind.startswith("Images") else "directory",
    )  # fmt: skip
    if st.button("Add to dataset", key="upload_add", disabled=not (files and may_add), help=why_add):
        result = uploads.add_files(folder, [(f.name, f.getvalue()) for f in files], actor=actor)
        ss["upload_result"] = (name, result.summary(), result.rows())
        ss["upload_round"] = ss.get("upload_round", 0) + 1  # a fresh uploader: the same files are not added twice
        st.rerun()
    if ss.get("upload_result", ("",))[0] == name:
        _, summary, result_rows = ss["upload_result"]
        (st.warning if any(r["result"] == "refused" for r in result_rows) else st.success)(summary)
        st.dataframe(result_rows, hide_index=True, key="upload_rows")

with t_bulk:
    c1, c2 = st.columns(2)
    prefix, suffix = (
        c1.text_input("Add prefix", key="bulk_prefix", persist_state="session"),
        c2.text_input("Add suffix", key="bulk_suffix", persist_state="session"),
    )
    find, replace = (
        c1.text_input("Find", key="bulk_find", persist_state="session"),
        c2.text_input("Replace with", key="bulk_replace", persist_state="session"),
    )
    uncaptioned = st.checkbox(
        "Also give uncaptioned images the prefix/suffix", key="bulk_uncaptioned", persist_state="session"
    )
    edit = dict(prefix=prefix, suffix=suffix, find=find, replace=replace, include_uncaptioned=uncaptioned)
    preview_box = st.container()  # the preview sits above the buttons but is drawn after them (fresh after Apply)
    b1, b2 = st.columns(2)
    wanted = prefix.strip() or suffix.strip() or find
    if b1.button("Apply", key="bulk_apply", type="primary", disabled=not (wanted and may_edit), help=why_edit):
        with shown_errors(st.error):
            changes = manage.bulk_edit_captions(folder, **edit, actor=actor)
            st.success(f"{len(changes)} caption(s) changed. Undo puts them back.")
    undo = caption_undo.last_bulk_edit(folder)
    if undo and b2.button(f"Undo the last bulk edit ({undo.count} captions)", key="bulk_undo", disabled=not may_edit,
                          help=why_edit):  # fmt: skip
        with shown_errors(st.error):
            done = caption_undo.undo_last_bulk_edit(folder, actor=actor)
            kept = f"; kept {len(done.kept)} edited since: {', '.join(done.kept[:5])}" if done.kept else ""
            ss["bulk_undone"] = (name, f"Undone: {len(done.restored)} caption(s) restored{kept}.")
            st.rerun()  # redraw without the undo button
    if ss.get("bulk_undone", ("",))[0] == name:
        st.success(ss.pop("bulk_undone")[1])
    if prefix.strip() or suffix.strip() or find:
        with preview_box, shown_errors(st.error):
            changes = manage.bulk_edit_captions(folder, **edit, dry_run=True)  # the preview: nothing is written
            more = f"; the first {BULK_PREVIEW_ROWS} below" if len(changes) > BULK_PREVIEW_ROWS else ""
            st.info(f"{len(changes)} caption(s) would change{more}.")
            if changes:
                st.dataframe(manage.caption_change_rows(changes[:BULK_PREVIEW_ROWS]), hide_index=True,
                             key="bulk_preview_rows")  # fmt: skip
    doomed = st.multiselect("Delete images", [i.image.name for i in folder.items()], key="delete_many")
    confirmed = doomed and st.checkbox(
        f"Yes, delete {len(doomed)} image(s) and their captions",
        key="delete_many_confirm",
        disabled=not may_delete,
        help=why_delete,
    )
    if confirmed and st.button("Delete selected images", key="delete_many_go"):
        ss["deleted_many"] = (name, f"Deleted {len(manage.delete_images(folder, doomed, actor=actor))} image(s).")
        st.rerun()  # every count on the page (table, gallery, statistics, check) from the new state
    if ss.get("deleted_many", ("",))[0] == name:
        st.success(ss.pop("deleted_many")[1])

with t_stats:
    s = stats.dataset_stats(folder)
    figures = {"Images": s.images, "Captioned": s.captioned, "Without caption": len(s.uncaptioned),
               "Unreadable": len(s.unreadable)}  # fmt: skip
    for column, (label, value) in zip(st.columns(4), figures.items(), strict=True):
        column.metric(label, value)
    for title, counts, label in (("Resolutions", s.resolutions, "size"),
                                 (f"Buckets at {s.resolution}px", s.buckets, "bucket"),
                                 ("Caption length", s.caption_length_bins, "words")):  # fmt: skip
        st.subheader(title)
        if counts:
            st.altair_chart(dv.size_chart(counts, label, by_size=label != "words"), key=f"chart_{label}")
    if s.uncaptioned:
        st.caption("Without caption: " + ", ".join(s.uncaptioned))

with t_check:
    models = dv.check_models(settings)
    tokens_by = st.selectbox("Count caption tokens with the text encoder of", ["(do not count)", *models],
                             key="check_tokens_model", help="Loads that model's tokenizer (a few seconds).")  # fmt: skip
    checked = ss.setdefault("checked_datasets", set())
    if st.button("Check dataset", key="check_run"):
        checked.add(name)
    if name in checked:  # once asked, the report stays current: it is redone after each upload, delete or edit
        with shown_errors(st.error):
            problems = report.current_report(folder, models.get(tokens_by))
            st.write(report.report_summary(problems, len(folder.items())))
            if problems:
                st.dataframe(report.report_rows(problems), hide_index=True, key="check_rows")
            st.subheader(f"Images per training bucket at {info.resolution}px")
            st.dataframe(stats.dataset_stats(folder).bucket_rows(), hide_index=True, key="check_buckets")

with t_settings, st.form("settings_form"):
    changed = settings_fields(f"set_{name}", info)
    if st.form_submit_button("Save settings", key="settings_save", disabled=not may_edit, help=why_edit):
        try:
            manage.update_dataset(settings, name, actor=actor, **changed)
            st.success("Saved.")
        except UserError as exc:
            st.error(str(exc))
with t_settings:
    confirm = st.text_input(f"Type {name} to delete this dataset and all its images", key="delete_ds_confirm")
    if st.button("Delete dataset", key="delete_ds", disabled=confirm != name or not may_delete, help=why_delete):
        manage.delete_dataset(settings, name, actor=actor)
        ss.pop("dataset", None)
        st.rerun()
