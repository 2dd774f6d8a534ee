"""Bulk caption edits keep exactly what the person typed; the last bulk edit can be undone, even after a reload."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from zimage.data.caption_undo import UNDO_FILE, UndoError, last_bulk_edit, undo_last_bulk_edit
from zimage.data.manage import bulk_edit_captions, create_dataset, open_dataset, write_caption


def dataset(zhome, captions: dict[str, str | None]):
    folder = create_dataset(zhome, "caps")
    folder.images_dir.mkdir(parents=True, exist_ok=True)
    for i, (name, caption) in enumerate(captions.items()):
        Image.new("RGB", (64, 64), (i * 40, 10, 10)).save(folder.images_dir / name)
        if caption is not None:
            (folder.images_dir / name).with_suffix(".txt").write_text(caption + "\n")
    return folder


def saved(folder, name: str) -> str:
    return (folder.images_dir / name).with_suffix(".txt").read_text()


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("photo of sks, ", "photo of sks, a cat\n"),  # the case: the trailing space is kept
        ("photo of sks ", "photo of sks a cat\n"),  # a space the person typed is the separator they chose
        ("photo of sks,", "photo of sks, a cat\n"),  # punctuation without a space gets one, never "sks,a"
        ("photo of sks", "photo of sks, a cat\n"),  # no separator typed: the usual ", "
    ],
)
def test_prefix_is_kept_exactly(zhome, prefix, expected):
    folder = dataset(zhome, {"a.png": "a cat"})
    preview = bulk_edit_captions(folder, prefix=prefix, dry_run=True)
    assert saved(folder, "a.png") == "a cat\n"  # a preview writes nothing
    assert [c.after for c in preview] == [expected.strip()]
    bulk_edit_captions(folder, prefix=prefix)
    assert saved(folder, "a.png") == expected


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [
        (", high quality", "a cat, high quality\n"),
        (" high quality", "a cat high quality\n"),
        ("high quality", "a cat, high quality\n"),
        (". Best", "a cat. Best\n"),
    ],
)
def test_suffix_is_kept_exactly(zhome, suffix, expected):
    folder = dataset(zhome, {"a.png": "a cat"})
    bulk_edit_captions(folder, suffix=suffix)
    assert saved(folder, "a.png") == expected


def test_replace_is_exact(zhome):
    folder = dataset(zhome, {"a.png": "a cat on a mat", "b.png": "a dog"})
    changes = bulk_edit_captions(folder, find="a mat", replace="the  red rug ")
    assert [c.image for c in changes] == ["a.png"]
    assert saved(folder, "a.png") == "a cat on the  red rug\n"  # inner spaces kept; only the line's ends trimmed
    bulk_edit_captions(folder, find=" on the  red rug", replace="")
    assert saved(folder, "a.png") == "a cat\n"


def test_undo_restores_the_last_bulk_edit_after_a_reload(zhome):
    folder = dataset(zhome, {"a.png": "a cat", "b.png": "a dog", "c.png": None})
    with pytest.raises(UndoError, match="no bulk edit to undo"):
        undo_last_bulk_edit(folder)
    bulk_edit_captions(folder, prefix="photo of sks, ", include_uncaptioned=True)
    assert saved(folder, "c.png") == "photo of sks\n"
    assert (folder.path / UNDO_FILE).exists()
    again = open_dataset(zhome, "caps")  # a fresh object, as after a page reload or in another process
    record = last_bulk_edit(again)
    assert record is not None and record.count == 3
    write_caption(again, "b.png", "edited by hand since")
    result = undo_last_bulk_edit(again)
    assert saved(folder, "a.png") == "a cat\n"
    assert not (folder.images_dir / "c.txt").exists()  # it had no caption before: the file goes again
    assert saved(folder, "b.png") == "edited by hand since\n"  # never overwrite a later hand edit
    assert result.restored == ["a.png", "c.png"] and result.kept == ["b.png"]
    assert last_bulk_edit(again) is None  # one undo per bulk edit
    with pytest.raises(UndoError, match="no bulk edit to undo"):
        undo_last_bulk_edit(again)


def test_a_preview_or_a_no_op_keeps_the_previous_undo(zhome):
    folder = dataset(zhome, {"a.png": "a cat"})
    bulk_edit_captions(folder, suffix="x")
    bulk_edit_captions(folder, suffix="y", dry_run=True)
    assert bulk_edit_captions(folder, suffix="x") == []  # already there: nothing changes
    undo_last_bulk_edit(folder)
    assert saved(folder, "a.png") == "a cat\n"


def test_a_damaged_undo_file_is_named(zhome):
    folder = dataset(zhome, {"a.png": "a cat"})
    (folder.path / UNDO_FILE).write_text("{not json")
    with pytest.raises(UndoError, match=UNDO_FILE):
        undo_last_bulk_edit(folder)
    assert last_bulk_edit(folder) is None


# -- the Datasets page (AppTest) -------------------------------------------------------------------
PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "1_Datasets.py")


def page(dataset_name: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["dataset"] = dataset_name
    return at.run()


def test_page_previews_then_applies_the_prefix_exactly_and_undoes_it_after_a_reload(zhome_demo):
    images = zhome_demo.datasets_dir / "demo-shapes" / "images"
    before = {p.name: p.read_text() for p in images.glob("*.txt")}
    at = page("demo-shapes")
    assert not at.exception
    assert not [b for b in at.button if b.key == "bulk_undo"]  # nothing to undo yet
    at.text_input(key="bulk_prefix").input("photo of sks, ").run()
    assert any(i.value == "16 caption(s) would change; the first 10 below." for i in at.info)
    preview = next(df.value for df in at.dataframe if "after" in df.value.columns)
    assert len(preview) == 10
    assert preview["after"].iloc[0] == "photo of sks, " + before["001.txt"].strip()
    assert {p.name: p.read_text() for p in images.glob("*.txt")} == before  # the preview wrote nothing

    at.button(key="bulk_apply").click().run()
    assert not at.exception and any("16 caption(s) changed" in s.value for s in at.success)
    assert images.joinpath("001.txt").read_text() == "photo of sks, " + before["001.txt"]
    assert any(i.value == "0 caption(s) would change." for i in at.info)  # the preview is fresh after Apply

    again = page("demo-shapes")  # a reload: the undo is still offered
    undo = next(b for b in again.button if b.key == "bulk_undo")
    assert "16 captions" in undo.label
    undo.click().run()
    assert any("Undone: 16 caption(s) restored." in s.value for s in again.success)
    assert {p.name: p.read_text() for p in images.glob("*.txt")} == before
    assert not [b for b in again.button if b.key == "bulk_undo"]


@pytest.mark.parametrize(
    ("field", "typed", "ends"),
    [("bulk_suffix", ", high quality", ", high quality\n"), ("bulk_suffix", " hq", " hq\n")],
)
def test_page_suffix_is_kept_exactly(zhome_demo, field, typed, ends):
    images = zhome_demo.datasets_dir / "demo-shapes" / "images"
    first = images.joinpath("001.txt").read_text().strip()
    at = page("demo-shapes")
    at.text_input(key=field).input(typed).run()
    at.button(key="bulk_apply").click().run()
    assert images.joinpath("001.txt").read_text() == first + ends


def test_page_replace_is_exact(zhome_demo):
    images = zhome_demo.datasets_dir / "demo-shapes" / "images"
    first = images.joinpath("001.txt").read_text()
    at = page("demo-shapes")
    at.text_input(key="bulk_find").input("plain light").run()
    at.text_input(key="bulk_replace").input("very  dark").run()
    at.button(key="bulk_apply").click().run()
    assert images.joinpath("001.txt").read_text() == first.replace("plain light", "very  dark")


def test_undo_of_a_bulk_edit_follows_ownership_and_is_recorded(zhome):
    """Undo changes captions like the edit did: the dataset's owner or an admin, recorded in events.jsonl."""
    from zimage.auth import Actor, PermissionDenied
    from zimage.data import caption_undo, manage
    from zimage.events import home_events_path, read_events

    (zhome.home / "settings.toml").write_text('[auth]\nmode = "password"\n')  # a team home: datasets have owners
    alice, bob = Actor("alice", "member", "ui", mode="password"), Actor("bob", "member", "ui", mode="password")
    folder = manage.create_dataset(zhome, "owned", actor=alice)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(folder.images_dir / "a.png")
    (folder.images_dir / "a.txt").write_text("a cat\n")
    manage.bulk_edit_captions(folder, prefix="photo of sks, ", actor=alice)
    with pytest.raises(PermissionDenied, match="alice"):
        caption_undo.undo_last_bulk_edit(folder, actor=bob)
    assert (folder.images_dir / "a.txt").read_text().strip() == "photo of sks, a cat"  # nothing changed
    caption_undo.undo_last_bulk_edit(folder, actor=alice)
    assert (folder.images_dir / "a.txt").read_text().strip() == "a cat"
    undos = [(e.user, e.result) for e in read_events(home_events_path(zhome)) if e.action.endswith(".undo")]
    assert undos == [("bob", "refused"), ("alice", "done")]
