import json

from PIL import Image

from zimage.cli import main
from zimage.data.folders import list_datasets
from zimage.demo import DEMO_DATASET, DEMO_TRIGGER


def _snapshot(root):
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


def test_demo_writes_model_and_dataset_and_is_idempotent(zhome, capsys):
    assert main(["demo"]) == 0
    model = zhome.base_models_dir / "tiny-zimage"
    assert (model / "model_index.json").exists()
    data = zhome.datasets_dir / DEMO_DATASET
    info = json.loads((data / "dataset.json").read_text())
    assert info["name"] == DEMO_DATASET and info["trigger_word"] == DEMO_TRIGGER
    assert set(info) >= {
        "name",
        "type",
        "trigger_word",
        "description",
        "resolution",
        "num_images",
        "created",
        "caption_prefix",
        "caption_suffix",
    }
    images = sorted((data / "images").glob("*.png"))
    assert len(images) >= 12 and info["num_images"] == len(images)
    ratios = {round(Image.open(p).width / Image.open(p).height, 2) for p in images}
    assert len(ratios) >= 3  # mixed aspect ratios
    for p in images:
        assert DEMO_TRIGGER in p.with_suffix(".txt").read_text()
    before = _snapshot(zhome.home)
    assert main(["demo"]) == 0
    assert _snapshot(zhome.home) == before
    assert "already there" in capsys.readouterr().out
    assert [d.path.name for d in list_datasets(zhome.datasets_dir)] == [DEMO_DATASET]
