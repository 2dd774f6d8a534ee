"""Checked uploads: every kind of bad file is refused with its reason, nothing escapes the dataset."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import pytest
from PIL import Image

from zimage.data.manage import create_dataset
from zimage.data.uploads import UploadLimits, add_files, add_folder, add_zip, inspect_image, safe_relative, safe_stem


def png_bytes(size=(64, 48), colour=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height (no pixel data needed to be refused)."""
    data = bytearray(png_bytes((1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture()
def ds(zhome):
    return create_dataset(zhome, "uploads", trigger_word="ohwx")


def reasons(report) -> dict[str, str]:
    return {r.source: r.reason for r in report.refused}


def test_valid_and_bad_files_each_get_a_result(ds, zhome):
    truncated = png_bytes((128, 128))[:200]
    report = add_files(
        ds,
        [
            ("My Photo (1).PNG", png_bytes()),
            ("notes.png", b"this is a text file renamed to png"),
            ("broken.png", truncated),
            ("empty.jpg", b""),
            ("bomb.png", huge_png_header(12000, 12000)),
            ("giant.png", huge_png_header(30000, 30000)),
            ("tiny.png", png_bytes((8, 8))),
            ("script.exe", b"MZ..."),
            ("anim.gif", _gif_bytes()),
            ("gif-renamed.png", _gif_bytes()),
        ],
    )
    assert [a.stored for a in report.accepted] == ["my-photo-1.png"]
    assert (ds.images_dir / "my-photo-1.png").read_bytes() == png_bytes()
    why = reasons(report)
    assert "not an image" in why["notes.png"]
    assert "damaged or truncated" in why["broken.png"]
    assert "empty" in why["empty.jpg"]
    assert "12000x12000" in why["bomb.png"] and "decompression bomb" in why["bomb.png"]
    assert "decompression bomb" in why["giant.png"]
    assert "too small" in why["tiny.png"]
    assert "not an allowed format" in why["script.exe"]
    assert "not an allowed format" in why["anim.gif"]
    assert "GIF images are not allowed" in why["gif-renamed.png"]
    assert sorted(p.name for p in ds.images_dir.iterdir()) == ["my-photo-1.png"]
    assert ds.read_info().num_images == 1


def _gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("P", (32, 32)).save(buf, format="GIF")
    return buf.getvalue()


def test_duplicates_by_content_and_safe_unique_names(ds):
    img = png_bytes((40, 40), (1, 2, 3))
    first = add_files(ds, [("a.png", img), ("a.jpg", png_bytes((40, 40), (9, 9, 9), fmt="JPEG"))])
    # same stem twice: the second gets its own stem, so captions never get shared
    assert sorted(a.stored for a in first.accepted) == ["a-2.jpg", "a.png"]
    again = add_files(ds, [("copy.png", img), ("same/again.png", img)])
    assert not again.accepted
    assert all("duplicate" in r.reason for r in again.refused)
    # a JPEG named .png is stored with the extension of what it really is
    jpeg = add_files(ds, [("../../etc/really jpeg.png", png_bytes((40, 40), (50, 60, 70), fmt="JPEG"))])
    assert not jpeg.accepted and "outside the dataset folder" in jpeg.refused[0].reason
    jpeg = add_files(ds, [("really jpeg.png", png_bytes((40, 40), (50, 60, 70), fmt="JPEG"))])
    assert jpeg.accepted[0].stored == "really-jpeg.jpg"


def test_zip_with_escapes_captions_and_junk(ds, zhome, tmp_path):
    outside = zhome.home / "escape.png"
    archive = zip_bytes(
        {
            "set/001.png": png_bytes((64, 64), (10, 10, 10)),
            "set/001.txt": b"a dark square\n",
            "set/002.webp": png_bytes((64, 32), (20, 200, 20), fmt="WEBP"),
            "../escape.png": png_bytes((64, 64), (30, 30, 30)),
            "/abs/evil.png": png_bytes((64, 64), (40, 40, 40)),
            "set/orphan.txt": b"no image for me",
            "__MACOSX/set/._001.png": b"junk",
            "set/.DS_Store": b"junk",
            "inner.zip": zip_bytes({"x.png": png_bytes()}),
        }
    )
    report = add_files(ds, [("photos.zip", archive)])
    stored = {a.source: a for a in report.accepted}
    assert set(stored) == {"photos.zip: set/001.png", "photos.zip: set/002.webp"}
    assert stored["photos.zip: set/001.png"].caption is True
    assert (ds.images_dir / "001.txt").read_text() == "a dark square\n"
    assert not (ds.images_dir / "002.txt").exists()
    why = reasons(report)
    assert "outside the dataset folder" in why["photos.zip: ../escape.png"]
    assert "outside the dataset folder" in why["photos.zip: /abs/evil.png"]
    assert "caption without an image" in why["photos.zip: set/orphan.txt"]
    assert "zip inside a zip" in why["photos.zip: inner.zip"]
    assert len(report.skipped) == 2
    assert not outside.exists() and not (zhome.datasets_dir / "escape.png").exists()
    files = sorted(p.relative_to(ds.path).as_posix() for p in ds.path.rglob("*") if p.is_file())
    assert [f for f in files if not f.startswith(".cache/")] == [
        "dataset.json",
        "images/001.png",
        "images/001.txt",
        "images/002.webp",
    ]


def test_zip_symlink_oversize_and_corrupt_archive(ds, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("link.png")
        link.external_attr = (0o120777 << 16) | 0
        zf.writestr(link, "/etc/passwd")
        zf.writestr("big.png", png_bytes((64, 64)))
    limits = UploadLimits(max_file_bytes=100)
    report = add_zip(ds, buf.getvalue(), limits=limits, label="x.zip")
    why = reasons(report)
    assert "symbolic link" in why["x.zip: link.png"]
    assert "over the limit" in why["x.zip: big.png"]
    bad = add_files(ds, [("broken.zip", b"PK\x03\x04 not really")])
    assert "not a readable zip" in reasons(bad)["broken.zip"]
    path = tmp_path / "disk.zip"
    path.write_bytes(zip_bytes({"a.png": png_bytes()}))
    assert [a.stored for a in add_zip(ds, path).accepted] == ["a.png"]


def test_folder_import_keeps_captions_and_skips_symlinks(ds, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "cat.png").write_bytes(png_bytes((50, 50), (5, 5, 5)))
    (src / "sub" / "cat.txt").write_text("a cat")
    (src / "dog.bmp").write_bytes(png_bytes((50, 50), (6, 6, 6), fmt="BMP"))
    (src / "link.png").symlink_to(src / "dog.bmp")
    report = add_folder(ds, src)
    assert sorted(a.stored for a in report.accepted) == ["cat.png", "dog.bmp"]
    assert (ds.images_dir / "cat.txt").read_text().strip() == "a cat"
    assert "symbolic link" in reasons(report)["link.png"]
    rows = report.rows()
    assert {r["result"] for r in rows} == {"added", "refused"}


def test_names_and_inspect_helpers():
    assert safe_stem("Été 2024 / IMG_001!") == "t-2024-img_001"
    assert safe_stem("???") == "image"
    assert str(safe_relative("a\\b/./c.png")) == "a/b/c.png"
    with pytest.raises(Exception, match="outside"):
        safe_relative("C:/windows/x.png")
    assert inspect_image(png_bytes((30, 20)), UploadLimits()) == ("PNG", 30, 20)


def test_flat_dataset_gets_new_images_beside_the_old_ones(zhome):
    from zimage.data.folders import DatasetFolder, DatasetInfo

    flat = DatasetFolder(zhome.datasets_dir / "flat")
    flat.path.mkdir()
    (flat.path / "old.png").write_bytes(png_bytes((40, 40), (7, 7, 7)))
    flat.write_info(DatasetInfo(name="flat"))
    report = add_files(flat, [("new.png", png_bytes((40, 40), (8, 8, 8))), ("new.txt", b"a caption")])
    assert [a.stored for a in report.accepted] == ["new.png"]
    assert not flat.images_dir.exists() and (flat.path / "new.txt").read_text() == "a caption\n"
    assert [i.image.name for i in flat.items()] == ["new.png", "old.png"] and flat.read_info().num_images == 2
