"""`zimage demo`: the tiny model, a small synthetic dataset and a tiny random-weight captioner (labelled as
such), so every page of the studio works with no download."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from zimage.data.folders import DatasetFolder, DatasetInfo
from zimage.settings import Settings
from zimage.tiny import TINY_MODEL_NAME, write_tiny_model

DEMO_DATASET = "demo-shapes"
DEMO_TRIGGER = "zshape"
_SIZES = [(256, 256), (320, 256), (256, 320), (384, 256), (256, 384), (288, 288)]
_SHAPES = ["circle", "square", "triangle", "ring"]
_COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 70), "orange": (240, 150, 30)}


def _draw(index: int, rng: random.Random) -> tuple[Image.Image, str]:
    w, h = _SIZES[index % len(_SIZES)]
    shape = _SHAPES[index % len(_SHAPES)]
    colour_name = list(_COLOURS)[(index // len(_SHAPES)) % len(_COLOURS)]
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    cx, cy, r = w // 2 + rng.randint(-20, 20), h // 2 + rng.randint(-20, 20), min(w, h) // 3
    fill = _COLOURS[colour_name]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(4, r // 4))
    caption = f"{DEMO_TRIGGER}, a {colour_name} {shape} on a plain light background"
    return img, caption


def write_demo_dataset(target: Path, count: int = 16, seed: int = 0) -> bool:
    """Write the synthetic dataset. Returns False (and touches nothing) if it already exists."""
    folder = DatasetFolder(target)
    if folder.exists():
        return False
    folder.images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        img, caption = _draw(i, rng)
        img.save(folder.images_dir / f"{i + 1:03d}.png")
        (folder.images_dir / f"{i + 1:03d}.txt").write_text(caption + "\n", encoding="utf-8")
    # dataset.json last: its presence marks the dataset complete.
    folder.write_info(
        DatasetInfo(
            name=DEMO_DATASET,
            type="concept",
            trigger_word=DEMO_TRIGGER,
            description="Synthetic coloured shapes for trying the studio without a download.",
            resolution=256,
        )
    )
    return True


def prepare_demo(settings: Settings) -> dict[str, bool]:
    """Idempotent: a second call writes nothing."""
    from zimage.captioning.tiny import DEMO_CAPTIONER, write_demo_captioner

    settings.ensure()
    return {
        "model": write_tiny_model(settings.base_models_dir / TINY_MODEL_NAME),
        "dataset": write_demo_dataset(settings.datasets_dir / DEMO_DATASET),
        "captioner": write_demo_captioner(settings.captioners_dir / DEMO_CAPTIONER),
    }
