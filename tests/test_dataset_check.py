"""The dataset check catches what hurts training: small images (per bucket), extreme aspect ratios, duplicates
(perceptual), captions missing the trigger word, empty or short captions, captions past the text encoder's
token limit; the size charts are in size order; the Check tab stays current after an upload or a delete."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

from zimage.data.manage import create_dataset, delete_images
from zimage.data.report import TEXT_TOKEN_LIMIT, current_report, validate_dataset
from zimage.data.stats import dataset_stats
from zimage.views.datasets import size_chart

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "1_Datasets.py")
CAPTION = "a photo of sks, a red disc on a grey wall"


def picture(size=(512, 512), seed=0) -> Image.Image:
    """A picture with structure (so the perceptual fingerprint has something to see)."""
    img = Image.new("RGB", size, (90 + seed * 30 % 160, 120, 200 - seed * 20 % 150))
    d = ImageDraw.Draw(img)
    w, h = size
    d.ellipse([w * (0.1 + 0.05 * seed), h * 0.2, w * 0.6, h * (0.7 + 0.02 * seed)], fill=(230, 40 + seed * 25, 40))
    d.rectangle([w * 0.65, h * 0.1 * (1 + seed % 3), w * 0.9, h * 0.5], fill=(20, 20 + seed * 40, 20))
    return img


def add(folder, name, img, caption=CAPTION, fmt=None):
    folder.images_dir.mkdir(parents=True, exist_ok=True)
    img.save(folder.images_dir / name, format=fmt)
    if caption is not None:
        (folder.images_dir / name).with_suffix(".txt").write_text(caption + "\n")


def kinds(problems) -> set[tuple[str, str]]:
    return {(p.image, p.kind) for p in problems}


def test_each_problem_that_hurts_training_is_flagged(zhome):
    folder = create_dataset(zhome, "chk", resolution=512, trigger_word="sks")
    add(folder, "a-good.png", picture(seed=0))
    add(folder, "b-below.png", picture((480, 480), seed=1))  # 512x512 bucket: upscaled 1.07x
    add(folder, "c-wide.png", picture((1500, 400), seed=2))
    add(folder, "d-notrigger.png", picture(seed=3), caption="a red disc on a grey wall")
    add(folder, "e-short.png", picture(seed=4), caption="sks disc")
    add(folder, "f-empty.png", picture(seed=5), caption="")
    copy = io.BytesIO()
    picture(seed=0).resize((384, 384)).save(copy, format="JPEG", quality=70)  # a resized, re-encoded copy
    add(folder, "g-copy.jpg", Image.open(copy))
    found = kinds(validate_dataset(folder))
    assert found == {
        ("b-below.png", "below_resolution"), ("c-wide.png", "extreme_aspect"),
        ("d-notrigger.png", "missing_trigger"), ("e-short.png", "short_caption"),
        ("f-empty.png", "empty_caption"), ("g-copy.jpg", "duplicate"), ("g-copy.jpg", "below_resolution"),
    }  # fmt: skip
    dup = next(p for p in validate_dataset(folder) if p.kind == "duplicate")
    assert "a-good.png" in dup.message and "resized or re-encoded" in dup.message

    s = dataset_stats(folder)
    rows = {r["bucket"]: r for r in s.bucket_rows()}
    assert rows["512x512"] == {"bucket": "512x512", "images": 6, "below training size": 2}  # b and the copy
    assert sum(r["images"] for r in rows.values()) == 7


def test_the_trigger_word_may_come_from_the_dataset_prefix_or_a_placeholder(zhome):
    folder = create_dataset(zhome, "trig", resolution=512, trigger_word="sks", caption_prefix="photo of sks")
    add(folder, "a.png", picture(seed=0), caption="a red disc on a grey wall")
    add(folder, "b.png", picture(seed=1), caption="[trigger] with a red disc")
    assert not {k for _, k in kinds(validate_dataset(folder))} & {"missing_trigger"}


def test_distinct_demo_images_are_not_duplicates(zhome_demo):
    folder = create_dataset(zhome_demo, "other")  # not needed: the demo dataset itself must come out clean
    assert validate_dataset(folder)[0].kind == "empty_dataset"
    from zimage.data.manage import open_dataset

    assert validate_dataset(open_dataset(zhome_demo, "demo-shapes")) == []


def test_captions_past_the_text_encoders_token_limit(zhome_demo):
    model = zhome_demo.base_models_dir / "tiny-zimage"
    folder = create_dataset(zhome_demo, "long", resolution=512, trigger_word="sks")
    add(folder, "a.png", picture(seed=0))
    add(folder, "b.png", picture(seed=1), caption="sks " + " ".join(["a red disc on a grey wall"] * 120))
    problems = validate_dataset(folder, model)
    assert kinds(problems) == {("b.png", "too_many_tokens")}
    assert f"which reads {TEXT_TOKEN_LIMIT}" in problems[0].message
    assert not {k for _, k in kinds(validate_dataset(folder))} & {"too_many_tokens"}  # without a model: not counted


def test_the_token_limit_is_the_trainers():
    from zimage.training.zimage_math import MAX_TEXT_TOKENS

    assert TEXT_TOKEN_LIMIT == MAX_TEXT_TOKENS


def test_the_report_is_redone_after_a_delete(zhome):
    folder = create_dataset(zhome, "fresh", resolution=512)
    add(folder, "a.png", picture(seed=0))
    add(folder, "b.png", picture(seed=0))  # an exact copy
    assert kinds(current_report(folder)) == {("b.png", "duplicate")}
    assert kinds(current_report(folder)) == {("b.png", "duplicate")}  # cached: same answer
    delete_images(folder, ["b.png"])
    assert current_report(folder) == []


def test_size_charts_are_in_size_order(zhome):
    folder = create_dataset(zhome, "sizes", resolution=256)
    for i, size in enumerate([(1024, 1024), (256, 256), (512, 384), (96, 96), (512, 384)]):
        add(folder, f"{i}.png", picture(size, seed=i))
    s = dataset_stats(folder)
    assert list(s.resolutions) == ["96x96", "256x256", "512x384", "1024x1024"]
    spec = size_chart(s.resolutions, "size").to_dict()
    assert spec["mark"]["type"] == "bar" and spec["encoding"]["x"]["sort"] == list(s.resolutions)
    bins = size_chart(s.caption_length_bins, "words", by_size=False).to_dict()
    assert bins["encoding"]["x"]["sort"] == list(s.caption_length_bins)  # 0 words, 1-5 words, ... as binned


# -- the Datasets page (AppTest) -------------------------------------------------------------------
def page(name: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["dataset"] = name
    return at.run()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_check_tab_flags_problems_and_stays_current_after_upload_and_delete(zhome_demo):
    from zimage.data import uploads
    from zimage.data.manage import open_dataset

    at = page("demo-shapes")
    assert not at.exception
    assert not [df for df in at.dataframe if "below training size" in df.value.columns]  # nothing until asked
    at.button(key="check_run").click().run()
    assert any(m.value == "All 16 images are ready for training." for m in at.markdown)
    buckets = next(df.value for df in at.dataframe if "below training size" in df.value.columns)
    assert buckets["images"].sum() == 16
    assert len(at.get("vega_lite_chart")) == 3  # resolutions, buckets and caption lengths are charts, not text

    folder = open_dataset(zhome_demo, "demo-shapes")
    small = Image.open(folder.images_dir / "001.png").resize((96, 96))
    result = uploads.add_files(folder, [("small-copy.png", png(small))])  # what the Upload tab calls
    assert result.rows()[0]["result"] != "refused"
    at.run()  # the next page run (the Upload tab reruns the page itself): no click on Check needed
    summary = next(m.value for m in at.markdown if "images" in m.value and ("error" in m.value or "ready" in m.value))
    assert summary.endswith("in 1 of 17 images.")
    rows = next(df.value for df in at.dataframe if "kind" in df.value.columns)
    assert set(rows["kind"]) == {"low_resolution", "duplicate", "missing_caption"}  # upscaled 2.7x, a copy of 001
    assert metric(at, "Images") == "17"

    stored = next(n for n in rows["image"])
    at.multiselect(key="delete_many").select(stored).run()
    at.checkbox(key="delete_many_confirm").check().run()
    at.button(key="delete_many_go").click().run()
    assert any("Deleted 1 image(s)." in s.value for s in at.success)
    assert any(m.value == "All 16 images are ready for training." for m in at.markdown)
    table = next(df.value for df in at.dataframe if "trigger word" in df.value.columns)
    assert int(table.loc[table["name"] == "demo-shapes", "images"].iloc[0]) == 16
    assert metric(at, "Images") == "16"


def metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_the_check_command_counts_tokens_with_a_model(zhome_demo, capsys):
    from zimage.cli import main

    folder = create_dataset(zhome_demo, "cli", resolution=512, trigger_word="sks")
    add(folder, "a.png", picture(seed=0), caption="sks " + " ".join(["a red disc on a grey wall"] * 120))
    assert main(["datasets", "check", "cli"]) == 0  # warnings only
    assert "tokens for the text encoder" not in capsys.readouterr().out
    assert main(["datasets", "check", "cli", "--model", "tiny-zimage"]) == 0
    assert "tokens for the text encoder, which reads 512" in capsys.readouterr().out
