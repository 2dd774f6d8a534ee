"""Datasets: create / edit / delete, captions and bulk edits, statistics, thumbnails, validation report."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from zimage.data.folders import BadName
from zimage.data.manage import (
    DatasetError,
    bulk_edit_captions,
    create_dataset,
    dataset_rows,
    delete_dataset,
    delete_images,
    open_dataset,
    update_dataset,
    write_caption,
)
from zimage.data.report import report_summary, validate_dataset
from zimage.data.stats import bucket_at, dataset_stats
from zimage.data.thumbnails import gallery, thumbnail, thumbnails_dir


def add_image(folder, name, size=(64, 64), colour=(120, 30, 30), caption=None):
    folder.images_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(folder.images_dir / name)
    if caption is not None:
        (folder.images_dir / name).with_suffix(".txt").write_text(caption + "\n")


def test_create_writes_dataset_json_and_refuses_bad_names(zhome):
    folder = create_dataset(
        zhome, "my-char", type="style", trigger_word=" ohwx ", description="d", resolution=512,
        caption_prefix="ohwx", caption_suffix="best quality",
    )  # fmt: skip
    info = json.loads(folder.info_path.read_text())
    assert info["name"] == "my-char" and info["type"] == "style" and info["trigger_word"] == "ohwx"
    assert info["resolution"] == 512 and info["caption_prefix"] == "ohwx" and info["num_images"] == 0
    assert set(info) == {"name", "type", "trigger_word", "description", "resolution", "num_images", "created",
                         "caption_prefix", "caption_suffix"}  # fmt: skip
    assert folder.images_dir.is_dir()
    with pytest.raises(BadName, match="slashes or '..'"):
        create_dataset(zhome, "../evil")
    with pytest.raises(BadName, match="must not be empty"):
        create_dataset(zhome, "  ")
    with pytest.raises(DatasetError, match="already taken by a dataset"):
        create_dataset(zhome, "my-char")
    (zhome.datasets_dir / "stray").mkdir()
    with pytest.raises(DatasetError, match="not a dataset"):
        create_dataset(zhome, "stray")
    with pytest.raises(DatasetError, match="type: 'poster'"):
        create_dataset(zhome, "other", type="poster")
    with pytest.raises(DatasetError, match="resolution: 1000 must be a multiple of 16"):
        create_dataset(zhome, "other", resolution=1000)
    assert not (zhome.datasets_dir / "other").exists()
    assert not (zhome.home.parent / "evil").exists()


def test_edit_list_and_delete(zhome):
    folder = create_dataset(zhome, "ds", trigger_word="zzt")
    add_image(folder, "a.png", caption="a red thing")
    add_image(folder, "b.png", colour=(1, 1, 1))
    info = update_dataset(zhome, "ds", trigger_word="new", resolution=768, type="concept")
    assert (info.trigger_word, info.resolution, info.type, info.num_images) == ("new", 768, "concept", 2)
    with pytest.raises(DatasetError, match="trigger_word: must be a single line"):
        update_dataset(zhome, "ds", trigger_word="a\nb")
    with pytest.raises(DatasetError, match="num_images: not a dataset setting"):
        update_dataset(zhome, "ds", num_images=9)
    rows = {r["name"]: r for r in dataset_rows(zhome)}
    assert rows["ds"]["images"] == 2 and rows["ds"]["captioned"] == 1 and rows["ds"]["trigger word"] == "new"
    delete_dataset(zhome, "ds")
    assert not folder.path.exists() and dataset_rows(zhome) == []
    assert [p.name for p in zhome.datasets_dir.iterdir()] == []
    with pytest.raises(DatasetError, match="no such dataset"):
        open_dataset(zhome, "ds")


def test_captions_bulk_edits_and_delete_images(zhome):
    folder = create_dataset(zhome, "caps")
    add_image(folder, "a.png", caption="a cat on a mat")
    add_image(folder, "b.png", colour=(2, 2, 2), caption="ohwx, a dog")
    add_image(folder, "c.png", colour=(3, 3, 3))
    write_caption(folder, "c.png", "  a bird\nin the sky ")
    assert (folder.images_dir / "c.txt").read_text() == "a bird in the sky\n"
    for bad in ("../dataset.json", "/etc/passwd", "nope.png", "a.txt"):
        with pytest.raises(DatasetError, match="image"):
            write_caption(folder, bad, "x")

    preview = bulk_edit_captions(folder, prefix="ohwx", dry_run=True)
    assert [c.image for c in preview] == ["a.png", "c.png"]  # b already starts with the prefix
    assert (folder.images_dir / "a.txt").read_text() == "a cat on a mat\n"
    bulk_edit_captions(folder, prefix="ohwx")
    assert (folder.images_dir / "a.txt").read_text() == "ohwx, a cat on a mat\n"
    assert bulk_edit_captions(folder, prefix="ohwx") == []  # idempotent

    changed = bulk_edit_captions(folder, find="cat", replace="tiger", suffix="photo")
    assert {c.image for c in changed} == {"a.png", "b.png", "c.png"}
    assert (folder.images_dir / "a.txt").read_text() == "ohwx, a tiger on a mat, photo\n"
    assert (folder.images_dir / "b.txt").read_text() == "ohwx, a dog, photo\n"
    with pytest.raises(DatasetError, match="give a prefix"):
        bulk_edit_captions(folder)

    thumbnail(folder, folder.images_dir / "b.png")
    assert list(thumbnails_dir(folder).glob("*.jpg"))
    assert delete_images(folder, ["b.png"]) == ["b.png"]
    assert not (folder.images_dir / "b.png").exists() and not (folder.images_dir / "b.txt").exists()
    assert not list(thumbnails_dir(folder).glob("*.jpg"))
    assert folder.read_info().num_images == 2
    with pytest.raises(DatasetError):
        delete_images(folder, ["a.png", "../dataset.json"])
    assert (folder.images_dir / "a.png").exists()  # nothing deleted when one name is bad


def test_uncaptioned_images_get_prefix_only_when_asked(zhome):
    folder = create_dataset(zhome, "u")
    add_image(folder, "x.png")
    assert bulk_edit_captions(folder, prefix="ohwx") == []
    assert bulk_edit_captions(folder, prefix="ohwx", include_uncaptioned=True)[0].after == "ohwx"
    assert (folder.images_dir / "x.txt").read_text() == "ohwx\n"


def test_stats_resolutions_buckets_and_caption_lengths(zhome):
    folder = create_dataset(zhome, "st", resolution=512)
    add_image(folder, "a.png", (512, 512), caption="one two three")
    add_image(folder, "b.png", (1024, 512), colour=(1, 1, 1), caption="")
    add_image(folder, "c.png", (512, 1024), colour=(2, 2, 2))
    (folder.images_dir / "d.png").write_bytes(b"garbage")
    stats = dataset_stats(folder)
    assert stats.images == 4 and stats.captioned == 2
    assert stats.uncaptioned == ["c.png", "d.png"] and stats.unreadable == ["d.png"]
    assert stats.resolutions == {"512x512": 1, "1024x512": 1, "512x1024": 1}
    wide, tall = bucket_at(1024, 512, 512), bucket_at(512, 1024, 512)
    assert stats.buckets == {"512x512": 1, f"{wide[0]}x{wide[1]}": 1, f"{tall[0]}x{tall[1]}": 1}
    assert wide[0] > wide[1] and wide[0] % 16 == 0 and wide[0] * wide[1] <= 512 * 512
    assert stats.caption_words == [3, 0]
    assert stats.caption_length_bins["0 words"] == 1 and stats.caption_length_bins["1-5 words"] == 1


def test_exif_rotated_size_is_used_for_stats(zhome):
    folder = create_dataset(zhome, "ex")
    exif = Image.Exif()
    exif[0x0112] = 6
    folder.images_dir.mkdir(exist_ok=True)
    Image.new("RGB", (80, 40)).save(folder.images_dir / "r.jpg", exif=exif)
    assert dataset_stats(folder).resolutions == {"40x80": 1}


def test_thumbnails_are_cached_and_follow_changes(zhome):
    folder = create_dataset(zhome, "th")
    add_image(folder, "a.png", (600, 300))
    (folder.images_dir / "bad.png").write_bytes(b"nope")
    first = thumbnail(folder, folder.images_dir / "a.png")
    assert Image.open(first).size == (256, 128)
    mtime = first.stat().st_mtime_ns
    assert thumbnail(folder, folder.images_dir / "a.png") == first and first.stat().st_mtime_ns == mtime
    Image.new("RGB", (100, 400)).save(folder.images_dir / "a.png")
    os.utime(folder.images_dir / "a.png", ns=(mtime + 10**9, mtime + 10**9))
    second = thumbnail(folder, folder.images_dir / "a.png")
    assert second != first and not first.exists() and Image.open(second).size == (64, 256)
    tiles = dict(gallery(folder))
    tile = thumbnail(folder, folder.images_dir / "a.png", tile=True)  # the gallery's letterboxed square
    assert tiles["a.png"] == str(tile) and Image.open(tile).size == (256, 256) and second.exists()
    assert isinstance(tiles["bad.png"], Image.Image)
    assert [p.name for p in folder.images_dir.iterdir() if p.suffix == ".jpg"] == []  # cache stays hidden


def test_validation_report_names_each_problem_with_a_fix(zhome):
    folder = create_dataset(zhome, "rep", resolution=512)
    # Flat colours far apart, so only dupe.png looks like another image (near-black and black would match).
    add_image(folder, "good.png", (512, 512), caption="a fine photo")
    add_image(folder, "small.png", (100, 100), colour=(20, 200, 20), caption="a small photo")
    add_image(folder, "tiny.png", (40, 40), colour=(20, 20, 200), caption="a tiny photo")
    add_image(folder, "wide.png", (1200, 300), colour=(220, 220, 20), caption="a wide photo")
    add_image(folder, "nocap.png", (512, 512), colour=(20, 220, 220))
    add_image(folder, "empty.png", (512, 512), colour=(230, 230, 230), caption="")
    add_image(folder, "dupe.png", (512, 512), caption="a copied photo")  # same pixels and bytes as good.png
    (folder.images_dir / "broken.png").write_bytes(b"not an image")
    (folder.images_dir / "lonely.txt").write_text("orphan")
    problems = validate_dataset(folder)
    kinds = {(p.image, p.kind): p for p in problems}
    assert set(kinds) == {
        ("small.png", "low_resolution"), ("tiny.png", "too_small"), ("wide.png", "extreme_aspect"),
        ("nocap.png", "missing_caption"), ("empty.png", "empty_caption"), ("good.png", "duplicate"),
        ("broken.png", "unreadable"), ("broken.png", "missing_caption"), ("lonely.txt", "orphan_caption"),
    }  # fmt: skip
    assert kinds[("tiny.png", "too_small")].level == "error" and kinds[("broken.png", "unreadable")].level == "error"
    assert "dupe.png" in kinds[("good.png", "duplicate")].message  # the first in name order is kept
    assert "upscaled" in kinds[("small.png", "low_resolution")].message
    assert all(p.fix for p in problems)
    assert report_summary(problems, 8) == "2 error(s) and 7 warning(s) in 8 of 8 images."
    empty = create_dataset(zhome, "empty")
    assert [p.kind for p in validate_dataset(empty)] == ["empty_dataset"]


def test_datasets_command(zhome, tmp_path, capsys):
    import zipfile

    from zimage.cli import main

    assert main(["datasets", "create", "../x"]) == 2
    assert "must not contain slashes" in capsys.readouterr().err
    assert main(["datasets", "create", "cli", "--trigger", "ohwx", "--resolution", "512"]) == 0
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (512, 512), (9, 9, 9)).save(src / "one.png")
    (src / "one.txt").write_text("first")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as zf:
        buf = __import__("io").BytesIO()
        Image.new("RGB", (512, 512), (8, 8, 8)).save(buf, format="PNG")
        zf.writestr("two.png", buf.getvalue())
    (tmp_path / "junk.png").write_text("text")
    capsys.readouterr()
    assert main(["datasets", "add", "cli", str(src), str(tmp_path / "missing")]) == 2
    assert not list((zhome.datasets_dir / "cli" / "images").iterdir())  # nothing half-added
    assert main(["datasets", "add", "cli", str(src), str(tmp_path / "more.zip"), str(tmp_path / "junk.png")]) == 0
    out = capsys.readouterr().out
    assert "2 image(s) added, 1 with caption, 1 refused" in out and "refused  junk.png: not an image" in out
    assert main(["datasets"]) == 0 and "cli" in capsys.readouterr().out
    assert main(["datasets", "check", "cli"]) == 0  # warnings only
    assert "warning  two.png: has no caption" in capsys.readouterr().out
    (zhome.datasets_dir / "cli" / "images" / "bad.png").write_bytes(b"x")
    assert main(["datasets", "check", "cli"]) == 1
    assert "fix: Delete it and upload a working copy." in capsys.readouterr().out
    assert main(["datasets", "stats", "cli"]) == 0 and "512x512: 2" in capsys.readouterr().out


def test_names_are_checked_as_the_whole_string():
    from zimage.data.folders import BadName, check_slug

    assert check_slug("good-name_1") == "good-name_1"
    for bad in ("name\n", "name\nother", "name ", "Name"):
        with pytest.raises(BadName):
            check_slug(bad)
