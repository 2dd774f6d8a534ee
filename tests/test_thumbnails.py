"""Thumbnails keep their aspect ratio: a 3:1 image is letterboxed whole into a square tile, never stretched,
in the dataset grid, the sample gallery and the compare grid (both of which use zimage.views.runs.thumbnail)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageChops
from streamlit.testing.v1 import AppTest

from zimage.data.manage import create_dataset
from zimage.data.thumbnails import TILE_BACKGROUND, gallery_page
from zimage.views.runs import thumbnail as sample_thumbnail

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "1_Datasets.py")


def wide_image(path: Path) -> Path:
    """900x300 (3:1), white with a black frame: its edges show where the picture sits in a tile."""
    img = Image.new("RGB", (900, 300), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 900, 12))
    img.paste((0, 0, 0), (0, 288, 900, 300))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def picture_box(tile: Image.Image) -> tuple[int, int, int, int]:
    """Where the picture is in the tile: everything that is not letterbox background."""
    background = Image.new("RGB", tile.size, TILE_BACKGROUND)
    diff = ImageChops.difference(tile, background).convert("L").point(lambda v: 255 if v > 24 else 0)
    return diff.getbbox()


def assert_letterboxed_3_to_1(path) -> None:
    tile = Image.open(path).convert("RGB")
    assert tile.size == (256, 256)  # every cell of a grid has the same shape
    left, top, right, bottom = picture_box(tile)
    width, height = right - left, bottom - top
    assert width == 256 and abs(height - 85) <= 2  # the whole picture, 3:1, not stretched to the square
    assert abs(top - (256 - bottom)) <= 2  # centred between equal bars


def test_dataset_grid_tiles_keep_the_aspect_ratio(zhome):
    folder = create_dataset(zhome, "wide")
    wide_image(folder.images_dir / "wide.png")
    tiles, pages = gallery_page(folder, 1)
    assert pages == 1 and tiles[0][0] == "wide.png"
    assert_letterboxed_3_to_1(tiles[0][1])


def test_sample_gallery_and_compare_tiles_keep_the_aspect_ratio(zhome, tmp_path):
    sample = wide_image(tmp_path / "run" / "samples" / "step-000004-0.png")
    assert_letterboxed_3_to_1(sample_thumbnail(zhome, sample))


def test_the_dataset_grid_shows_square_cells(zhome):
    folder = create_dataset(zhome, "wide")
    wide_image(folder.images_dir / "wide.png")
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["dataset"] = "wide"
    at.run()
    assert not at.exception
    (grid,) = [c for c in at.get("component_instance") if "image_select" in c.proto.component_name]
    args = json.loads(grid.proto.json_args)
    assert args["use_container_width"] is False  # fixed square cells: the component never crops a tile
