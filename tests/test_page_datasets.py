"""AppTest of the Datasets page: create (and refuse bad names), uploads with reasons, captions, bulk prefix."""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image
from streamlit.testing.v1 import AppTest

from zimage.data.thumbnails import picked_image

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "1_Datasets.py")


def app() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60)


def png(size=(64, 64), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def oversized_png(width=12000, height=12000) -> bytes:
    data = bytearray(png((1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def frame(at, column: str):
    """The first dataframe on the page that has `column` (AppTest does not expose dataframe keys)."""
    return next(df.value for df in at.dataframe if column in df.value.columns)


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def create(at, name: str, trigger: str = "") -> AppTest:
    at.text_input(key="new_name").input(name)
    at.text_input(key="new_trigger").input(trigger)
    return at.button(key="new_submit").click().run()


def test_create_refuses_bad_names_and_creates(zhome):
    at = app().run()
    assert not at.exception and any("No datasets yet" in i.value for i in at.info)
    create(at, "../evil")
    assert any("must not contain slashes or '..'" in e for e in errors(at))
    create(at, "")
    assert any("must not be empty" in e for e in errors(at))
    create(at, "cats", trigger="ohwx cat")
    assert not at.exception and any("Created dataset cats" in s.value for s in at.success)
    info = json.loads((zhome.datasets_dir / "cats" / "dataset.json").read_text())
    assert info["trigger_word"] == "ohwx cat" and info["type"] == "character" and info["resolution"] == 1024
    assert at.selectbox(key="dataset").value == "cats"
    create(at, "cats")
    assert any("already taken" in e for e in errors(at))
    assert sorted(p.name for p in zhome.datasets_dir.iterdir()) == ["cats"]
    assert not (zhome.home / "evil").exists() and not (zhome.home.parent / "evil").exists()
    table = frame(at, "trigger word")
    assert list(table["name"]) == ["cats"] and int(table["images"].iloc[0]) == 0


def test_upload_refuses_bad_files_with_reasons(zhome):
    from zimage.data.manage import create_dataset

    create_dataset(zhome, "up")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.png", png((64, 64), (1, 2, 3)))
        zf.writestr("inside.png", png((64, 64), (4, 5, 6)))
        zf.writestr("inside.txt", "a zipped caption")
    files = [
        ("good.png", png(), "image/png"),
        ("corrupt.png", png()[:90], "image/png"),
        ("notes.png", b"just some text, renamed", "image/png"),
        ("huge.png", oversized_png(), "image/png"),
        ("bundle.zip", archive.getvalue(), "application/zip"),
    ]
    at = app().run()
    at.tabs[1].radio(key="upload_kind")  # the upload tab is there
    at.file_uploader(key="uploader_0").set_value(files)
    at.run()
    at.button(key="upload_add").click().run()
    assert not at.exception
    rows = {r["file"]: r for r in frame(at, "result").to_dict("records")}
    assert rows["good.png"]["result"] == "added" and rows["bundle.zip: inside.png"]["result"] == "added"
    assert "damaged or truncated" in rows["corrupt.png"]["detail"]
    assert "not an image" in rows["notes.png"]["detail"]
    assert "decompression bomb" in rows["huge.png"]["detail"]
    assert "outside the dataset folder" in rows["bundle.zip: ../escape.png"]["detail"]
    assert any("2 image(s) added, 1 with caption, 4 refused" in w.value for w in at.warning)
    images = zhome.datasets_dir / "up" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["good.png", "inside.png", "inside.txt"]
    assert not (zhome.datasets_dir / "escape.png").exists() and not (zhome.home / "escape.png").exists()
    assert at.file_uploader(key="uploader_1")  # a fresh, empty uploader: nothing gets added twice


def test_edit_caption_bulk_prefix_and_delete(zhome_demo):
    images = zhome_demo.datasets_dir / "demo-shapes" / "images"
    at = app()
    at.session_state["dataset"] = "demo-shapes"
    at.session_state["image_pick"] = "003.png"
    at.run()
    assert not at.exception
    editor = next(t for t in at.text_area if str(t.key).startswith("caption_demo-shapes_003.png"))
    assert editor.value == images.joinpath("003.txt").read_text().strip()
    editor.input("zshape, a hand-written caption")
    at.button(key="caption_save").click().run()
    assert images.joinpath("003.txt").read_text() == "zshape, a hand-written caption\n"
    assert any("Saved the caption of 003.png" in s.value for s in at.success)

    at.text_input(key="bulk_prefix").input("best quality").run()  # the preview shows as soon as one is typed
    assert any("16 caption(s) would change" in i.value for i in at.info)
    assert images.joinpath("001.txt").read_text().startswith("zshape")
    at.button(key="bulk_apply").click().run()
    assert any("16 caption(s) changed" in s.value for s in at.success)
    assert all(p.read_text().startswith("best quality, zshape") for p in images.glob("*.txt"))

    assert not [b for b in at.button if b.key == "delete_one"]  # no delete button before confirming
    at.checkbox(key="delete_one_confirm_003.png").check().run()
    at.button(key="delete_one").click().run()
    assert not images.joinpath("003.png").exists() and not images.joinpath("003.txt").exists()
    assert at.selectbox(key="image_pick").value == "001.png"
    assert not [b for b in at.button if b.key == "delete_one"]  # the next image needs its own confirmation
    assert json.loads((images.parent / "dataset.json").read_text())["num_images"] == 15


def test_statistics_check_and_settings(zhome_demo):
    at = app()
    at.session_state["dataset"] = "demo-shapes"
    at.run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "16" and metrics["Without caption"] == "0"
    at.button(key="check_run").click().run()
    assert any(m.value == "All 16 images are ready for training." for m in at.markdown)
    at.text_input(key="set_demo-shapes_trigger").input("newtrigger")
    at.button(key="settings_save").click().run()
    info = json.loads((zhome_demo.datasets_dir / "demo-shapes" / "dataset.json").read_text())
    assert info["trigger_word"] == "newtrigger" and info["num_images"] == 16


def test_gallery_click_logic():
    names = ["a.png", "b.png", "c.png"]
    assert picked_image(names, 0, None, "c.png") == "c.png"  # first render: the component's default, no click
    assert picked_image(names, 1, 0, "c.png") == "b.png"  # a new click wins
    assert picked_image(names, 1, 1, "c.png") == "c.png"  # the same value again is not a click
    assert picked_image(names, 7, 1, "gone.png") == "a.png"  # stale values fall back to the first image
    assert picked_image([], None, None, None) is None
