import numpy as np
import pytest
from PIL import Image

from zimage.data.folders import BadName, check_slug
from zimage.data.images import ImageProblem, open_rgb


def test_conversions_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    out = open_rgb(tmp_path / "a.png")
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = open_rgb(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60

    arr = np.full((6, 6), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    Image.fromarray(arr).save(tmp_path / "d.png")
    img16 = open_rgb(tmp_path / "d.png")
    assert img16.getpixel((3, 3)) == (255, 255, 255) and img16.getpixel((0, 0)) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert open_rgb(tmp_path / "r.jpg").size == (20, 40)


@pytest.mark.parametrize(
    "name,content,reason",
    [("empty.png", b"", "empty"), ("text.png", b"hello, not an image", "not an image")],
)
def test_bad_files_are_named(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageProblem, match=f"{name}: .*{reason}"):
        open_rgb(tmp_path / name)


def test_truncated_and_small(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageProblem, match="cut.png"):
        open_rgb(tmp_path / "cut.png")
    with pytest.raises(ImageProblem, match="smaller than 128"):
        open_rgb(tmp_path / "t.png", min_side=128)


@pytest.mark.parametrize("bad", ["", "../evil", "a/b", "/abs", "UPPER", "-x", "a" * 65])
def test_slug_refusals_name_the_field(bad):
    with pytest.raises(BadName, match="output_name"):
        check_slug(bad, "output_name")


def test_slug_accepts_plain_names():
    assert check_slug("my-lora_v2") == "my-lora_v2"
