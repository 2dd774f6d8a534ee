"""Training data: buckets, captions, awkward image files, the batch sampler and the feature caches."""

from __future__ import annotations

import gc
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from train_support import fast_config, make_home, one_thread_per_module  # noqa: F401 - autouse

from zimage.config import MachineInfo, build_config, validate_config
from zimage.data.buckets import bucket_for, fit_to_bucket, make_buckets
from zimage.data.cache import FeatureCache, component_fingerprint
from zimage.data.captions import build_caption, drop_caption
from zimage.data.folders import DatasetFolder, DatasetInfo
from zimage.data.training_set import BucketBatchSampler, load_pixels, scan_dataset
from zimage.runfolder import RunFolder
from zimage.training.reporting import Reporter
from zimage.training.trainer import LoraTrainer

CPU = MachineInfo(cuda=False, bf16=True)


# -- buckets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_buckets_are_multiples_of_16_near_the_target_area(resolution):
    buckets = make_buckets(resolution)
    area = resolution * resolution
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.85 * area <= w * h <= area, (w, h)
        assert max(w / h, h / w) <= 4.0
    assert len({round(w / h, 2) for w, h in buckets}) == len(buckets)  # one bucket per ratio


def test_bucket_for_picks_the_closest_ratio_and_fit_crops_exactly():
    buckets = make_buckets(512)
    assert bucket_for(1000, 1000, buckets) == (512, 512)
    wide = bucket_for(1600, 900, buckets)
    tall = bucket_for(900, 1600, buckets)
    assert wide[0] > wide[1] and tall == (wide[1], wide[0])
    assert abs(wide[0] / wide[1] - 16 / 9) < 0.1
    img = Image.new("RGB", (1600, 900), "red")
    assert fit_to_bucket(img, wide).size == wide
    assert fit_to_bucket(Image.new("RGB", (100, 60)), wide).size == wide  # small images are scaled up


# -- captions -------------------------------------------------------------------------------------
def test_trigger_word_replaces_placeholder_or_is_prepended():
    assert build_caption("a photo of [trigger] smiling", "ohwx man") == "a photo of ohwx man smiling"
    assert build_caption("a photo of a man", "ohwx man") == "ohwx man, a photo of a man"
    assert build_caption("ohwx man at the beach", "ohwx man") == "ohwx man at the beach"  # not twice
    assert build_caption(None, "ohwx") == "ohwx"  # no caption file: the trigger alone
    assert build_caption("a cat", "") == "a cat"


def test_prefix_and_suffix_from_dataset_json_join_cleanly():
    assert build_caption("a cat", "", prefix="photo,", suffix="35mm") == "photo, a cat, 35mm"
    assert build_caption("a cat", "zz", prefix="[trigger] style", suffix="") == "zz style, a cat"
    assert build_caption("  two\nlines  ", "", "", "") == "two lines"


def test_caption_dropout_rate_and_determinism():
    rng = random.Random(0)
    dropped = sum(drop_caption("x", rng, 0.25) == "" for _ in range(4000))
    assert 850 < dropped < 1150
    assert drop_caption("x", random.Random(1), 0.0) == "x"
    a = [drop_caption("x", random.Random(5), 0.5) for _ in range(3)]
    assert a == [drop_caption("x", random.Random(5), 0.5) for _ in range(3)]


# -- awkward files --------------------------------------------------------------------------------
def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_awkward_dataset(folder):
    """Seven kinds of trouble plus two normal images; returns the names that must be skipped."""
    images = folder / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (256, 256), (200, 30, 30)).save(images / "good.png")
    (images / "good.txt").write_text("a red square, [trigger] style")
    Image.new("RGB", (320, 256), (30, 30, 200)).save(images / "good2.png")
    full = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)))
    (images / "corrupt.png").write_bytes(full[: len(full) // 2])
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("this is a text file with an image extension")
    Image.new("CMYK", (300, 256), (0, 255, 255, 0)).save(images / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (384, 256), (20, 160, 20)).save(images / "rotated.jpg", exif=exif)
    deep = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    Image.fromarray(deep).save(images / "deep16.png")
    assert Image.open(images / "deep16.png").mode.startswith("I")
    rgba = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (64, 64, 192, 192))
    rgba.save(images / "rgba.png")
    Image.new("RGB", (40, 40), "white").save(images / "tiny.png")
    DatasetFolder(folder).write_info(DatasetInfo(name=folder.name, trigger_word="zz", resolution=256))
    return {"corrupt.png", "empty.png", "notes.jpg", "tiny.png"}


@pytest.fixture()
def awkward(tmp_path, tiny_model_dir):
    settings = make_home(tmp_path / "home", tiny_model_dir)
    skipped = write_awkward_dataset(settings.datasets_dir / "awkward")
    return settings, skipped


def test_scan_keeps_convertible_images_and_names_every_bad_file(awkward):
    settings, expected_skips = awkward
    ts = scan_dataset(settings.datasets_dir / "awkward", 256, min_side=64, cache=FeatureCache(settings.cache_dir))
    assert {s.name for s in ts.skipped} == expected_skips
    reasons = {s.name: s.reason for s in ts.skipped}
    assert "empty" in reasons["empty.png"] and "not an image" in reasons["notes.jpg"]
    assert "truncated" in reasons["corrupt.png"] or "damaged" in reasons["corrupt.png"]
    assert "smaller than 64" in reasons["tiny.png"]
    items = {it.name: it for it in ts.items}
    assert set(items) == {"good.png", "good2.png", "cmyk.jpg", "rotated.jpg", "deep16.png", "rgba.png"}
    assert items["rotated.jpg"].size == (256, 384)  # EXIF orientation applied: now tall
    assert items["rotated.jpg"].bucket[1] > items["rotated.jpg"].bucket[0]
    assert items["good.png"].caption == "a red square, zz style"
    assert items["good2.png"].caption == "zz" and items["good2.png"].caption_missing

    rgba = load_pixels(items["rgba.png"])
    assert rgba.shape == (3, 256, 256) and rgba.min() >= -1 and rgba.max() <= 1
    assert torch.allclose(rgba[:, 5, 5], torch.ones(3))  # transparent corner became white
    assert torch.allclose(rgba[:, 128, 128], torch.tensor([-1.0, -1.0, 1.0]))  # the opaque blue
    cmyk = load_pixels(items["cmyk.jpg"])
    assert cmyk[0].mean() > 0.7 and cmyk[1].mean() < -0.7  # CMYK (0,255,255,0) is red
    deep = load_pixels(items["deep16.png"])
    assert deep.min() < -0.9 and deep.max() > 0.9  # 16-bit range scaled, not clipped to white


def test_an_awkward_dataset_trains_and_the_log_names_each_skipped_file(awkward, tmp_path):
    settings, expected_skips = awkward
    resolved = validate_config(build_config(fast_config(dataset_path="awkward", num_steps=2)), settings, CPU)
    run = RunFolder(tmp_path / "run")
    trainer = LoraTrainer(resolved, settings, Reporter(run))
    try:
        trainer.setup()
        result = trainer.train()
    finally:
        trainer.cleanup()
    assert result.state == "completed" and result.output_path.exists()
    log = run.log_path.read_text()
    for name in expected_skips:
        assert f"Skipped {name}:" in log
    assert "6 images, 4 skipped" in log
    assert "No caption file for" in log and "good2.png" in log


# -- the sampler ----------------------------------------------------------------------------------
def test_sampler_batches_share_a_bucket_and_resume_exactly():
    buckets = [(256, 256)] * 5 + [(320, 208)] * 4 + [(208, 320)] * 3
    a = BucketBatchSampler(buckets, batch_size=2, seed=3)
    seen = [a.next_batch() for _ in range(20)]
    for batch in seen:
        assert len({buckets[i] for i in batch}) == 1 and 1 <= len(batch) <= 2
    first_epoch = [i for b in seen[:7] for i in b]
    assert sorted(first_epoch) == list(range(12))  # every item once per epoch (7 batches)
    again, other = BucketBatchSampler(buckets, 2, seed=3), BucketBatchSampler(buckets, 2, seed=4)
    assert [again.next_batch() for _ in range(20)] == seen
    assert [other.next_batch() for _ in range(20)] != seen

    b = BucketBatchSampler(buckets, batch_size=2, seed=3)
    for _ in range(9):
        b.next_batch()
    state = b.state_dict()
    c = BucketBatchSampler(buckets, batch_size=2, seed=3)
    c.load_state_dict(state)
    assert [c.next_batch() for _ in range(11)] == seen[9:]


def test_sampler_splits_batches_between_ranks():
    buckets = [(256, 256)] * 7
    r0 = BucketBatchSampler(buckets, 1, seed=0, rank=0, world_size=2)
    r1 = BucketBatchSampler(buckets, 1, seed=0, rank=1, world_size=2)
    b0, b1 = [r0.next_batch()[0] for _ in range(4)], [r1.next_batch()[0] for _ in range(4)]
    assert set(b0) | set(b1) == set(range(7))  # one epoch covers every item
    assert len(set(b0) & set(b1)) <= 1  # only the batch repeated to even the ranks out is shared


# -- caches --------------------------------------------------------------------------------------
def test_component_fingerprint_ignores_location_but_sees_content(tmp_path, tiny_model_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert component_fingerprint(copy / "vae") == component_fingerprint(tiny_model_dir / "vae")
    cfg = copy / "vae" / "config.json"
    cfg.write_text(cfg.read_text().replace("0.3611", "0.3612"))
    assert component_fingerprint(copy / "vae") != component_fingerprint(tiny_model_dir / "vae")


def test_feature_cache_writes_whole_entries_only(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    assert cache.load("text", "ab" * 32) is None
    path = cache.save("text", "ab" * 32, {"embedding": torch.arange(6.0).view(2, 3)})
    assert torch.equal(cache.load("text", "ab" * 32)["embedding"], torch.arange(6.0).view(2, 3))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    path.write_bytes(b"garbage")
    assert cache.load("text", "ab" * 32) is None  # a damaged entry is a miss, not a crash


def test_encoders_leave_memory_before_training(tmp_path, tiny_model_dir):
    """With a cold cache the VAE and text encoder are loaded, used and gone when setup() returns."""
    from diffusers import AutoencoderKL
    from transformers import Qwen3Model

    settings = make_home(tmp_path / "home", tiny_model_dir)
    resolved = validate_config(build_config(fast_config()), settings, CPU)
    trainer = LoraTrainer(resolved, settings)
    try:
        trainer.setup()
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, AutoencoderKL | Qwen3Model)]
        assert trainer.cache_stats.vae_loaded and trainer.cache_stats.text_encoder_loaded
        assert trainer.cache_stats.latents_encoded == 16
        assert alive == []
    finally:
        trainer.cleanup()
