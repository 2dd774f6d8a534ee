"""Datasets: create and configure datasets, upload images, edit captions, check before training."""

import streamlit as st
from streamlit_image_select import image_select

from zimage.data import manage, report, stats, thumbnails, uploads
from zimage.data.folders import DATASET_TYPES, DatasetInfo
from zimage.errors import UserError
from zimage.settings import get_settings
from zimage.views import keep_user_name

st.set_page_config(page_title="Datasets", page_icon="🗂️", layout="wide")
keep_user_name(st.session_state)
settings = get_settings().ensure()
ss = st.session_state
st.title("Datasets")


def settings_fields(prefix: str, info: DatasetInfo) -> dict:
    """The dataset.json fields as widgets (the create form and the settings tab share them)."""
    c1, c2, c3 = st.columns(3)
    return {
        "type": c1.selectbox("Type", DATASET_TYPES, DATASET_TYPES.index(info.type), key=f"{prefix}_type"),
        "trigger_word": c2.text_input("Trigger word", info.trigger_word, key=f"{prefix}_trigger"),
        "resolution": c3.number_input("Resolution", 64, 4096, info.resolution, 64, key=f"{prefix}_res"),
        "caption_prefix": c1.text_input("Caption prefix", info.caption_prefix, key=f"{prefix}_prefix"),
        "caption_suffix": c2.text_input("Caption suffix", info.caption_suffix, key=f"{prefix}_suffix"),
        "description": st.text_area("Description", info.description, key=f"{prefix}_desc"),
    }


with st.expander("Create a dataset", expanded=not manage.dataset_rows(settings)), st.form("new_form"):
    new_name = st.text_input("Name (lowercase letters, digits, - and _)", key="new_name")
    fields = settings_fields("new", DatasetInfo(name=""))
    if st.form_submit_button("Create dataset", key="new_submit"):
        try:
            manage.create_dataset(settings, new_name, **fields)
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
name = st.selectbox("Dataset", names, key="dataset")
folder = manage.open_dataset(settings, name)
if problem := folder.problem():  # a damaged dataset.json: say which field, touch nothing
    st.error(f"{problem}. Fix or replace {folder.info_path}; the other datasets work as usual.")
    st.stop()
info = folder.read_info()
t_images, t_upload, t_bulk, t_stats, t_check, t_settings = st.tabs(
    ["Images & captions", "Upload", "Bulk edit", "Statistics", "Check", "Settings"]
)

with t_images:
    items = [i.image.name for i in folder.items()]
    if not items:
        st.info("No images yet: add some on the Upload tab.")
    else:
        page = st.number_input("Page", 1, max(1, -(-len(items) // 24)), 1, key="gallery_page")
        tiles, _pages = thumbnails.gallery_page(folder, page)
        pick_names, gallery_key = [n for n, _ in tiles], f"gallery_{name}_{page}"
        shown = pick_names.index(ss["image_pick"]) if ss.get("image_pick") in pick_names else 0
        clicked = image_select("Pick an image", [t for _, t in tiles], pick_names, shown, return_value="index",
                               key=gallery_key)  # fmt: skip
        last = ss.setdefault("gallery_last", {})
        ss["image_pick"] = thumbnails.picked_image(pick_names, clicked, last.get(gallery_key), ss.get("image_pick"))
        last[gallery_key] = clicked
        pick = st.selectbox("Image", pick_names, key="image_pick")
        item = manage.find_item(folder, pick)
        left, right = st.columns([1, 2])
        left.image(str(thumbnails.thumbnail(folder, item.image, 512) or thumbnails.placeholder()))
        version = item.caption_path.stat().st_mtime_ns if item.caption_path.exists() else 0  # fresh after edits
        text = right.text_area("Caption", item.caption or "", height=150, key=f"caption_{name}_{pick}_{version}")
        if right.button("Save caption", key="caption_save"):
            manage.write_caption(folder, pick, text)
            right.success(f"Saved the caption of {pick}.")
        # The confirmation is per image, so it never carries over to the image shown after a delete.
        if right.checkbox("Yes, delete this image", key=f"delete_one_confirm_{pick}") and right.button(
            "Delete image", key="delete_one"
        ):
            manage.delete_images(folder, [pick])
            ss.pop("image_pick", None)
            st.rerun()

with t_upload:
    kind = st.radio("Upload", ["Images, captions (.txt) or a zip", "A folder"], horizontal=True, key="upload_kind")
    files = st.file_uploader(
        "Files", type=list(uploads.UPLOAD_TYPES), key=f"uploader_{ss.get('upload_round', 0)}",
        accept_multiple_files=True if kind.startswith("Images") else "directory",
    )  # fmt: skip
    if st.button("Add to dataset", key="upload_add", disabled=not files):
        result = uploads.add_files(folder, [(f.name, f.getvalue()) for f in files])
        ss["upload_result"] = (name, result.summary(), result.rows())
        ss["upload_round"] = ss.get("upload_round", 0) + 1  # a fresh uploader: the same files are not added twice
        st.rerun()
    if ss.get("upload_result", ("",))[0] == name:
        _, summary, result_rows = ss["upload_result"]
        (st.warning if any(r["result"] == "refused" for r in result_rows) else st.success)(summary)
        st.dataframe(result_rows, hide_index=True, key="upload_rows")

with t_bulk:
    c1, c2 = st.columns(2)
    prefix, suffix = c1.text_input("Add prefix", key="bulk_prefix"), c2.text_input("Add suffix", key="bulk_suffix")
    find, replace = c1.text_input("Find", key="bulk_find"), c2.text_input("Replace with", key="bulk_replace")
    uncaptioned = st.checkbox("Also give uncaptioned images the prefix/suffix", key="bulk_uncaptioned")
    b1, b2 = st.columns(2)
    for button, dry in (
        (b1.button("Preview", key="bulk_preview"), True),
        (b2.button("Apply", key="bulk_apply"), False),
    ):
        if button:
            try:
                changes = manage.bulk_edit_captions(folder, prefix=prefix, suffix=suffix, find=find, replace=replace,
                                                    include_uncaptioned=uncaptioned, dry_run=dry)  # fmt: skip
                st.info(f"{len(changes)} caption(s) {'would change' if dry else 'changed'}.")
                st.dataframe(manage.caption_change_rows(changes), hide_index=True, key=f"bulk_rows_{dry}")
            except UserError as exc:
                st.error(str(exc))
    doomed = st.multiselect("Delete images", [i.image.name for i in folder.items()], key="delete_many")
    confirmed = doomed and st.checkbox(
        f"Yes, delete {len(doomed)} image(s) and their captions", key="delete_many_confirm"
    )
    if confirmed and st.button("Delete selected images", key="delete_many_go"):
        st.success(f"Deleted {len(manage.delete_images(folder, doomed))} image(s).")

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
            st.bar_chart(s.table(counts, label), x=label, y="images")
    if s.uncaptioned:
        st.caption("Without caption: " + ", ".join(s.uncaptioned))

with t_check:
    if st.button("Check dataset", key="check_run"):
        problems = report.validate_dataset(folder)
        st.write(report.report_summary(problems, len(folder.items())))
        if problems:
            st.dataframe(report.report_rows(problems), hide_index=True, key="check_rows")

with t_settings, st.form("settings_form"):
    changed = settings_fields(f"set_{name}", info)
    if st.form_submit_button("Save settings", key="settings_save"):
        try:
            manage.update_dataset(settings, name, **changed)
            st.success("Saved.")
        except UserError as exc:
            st.error(str(exc))
with t_settings:
    confirm = st.text_input(f"Type {name} to delete this dataset and all its images", key="delete_ds_confirm")
    if st.button("Delete dataset", key="delete_ds", disabled=confirm != name):
        manage.delete_dataset(settings, name)
        ss.pop("dataset", None)
        st.rerun()
