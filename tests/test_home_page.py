from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


def test_home_lists_demo_model_and_dataset(zhome_demo):
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    assert not at.exception
    frames = [df.value for df in at.dataframe]
    models = next(f for f in frames if "type" in f.columns and "sampling" in f.columns)
    tiny = models[models["name"] == "tiny-zimage"].iloc[0]
    assert tiny["status"] == "ready" and tiny["type"] == "de_turbo"
    datasets = next(f for f in frames if "trigger word" in f.columns)
    row = datasets[datasets["name"] == "demo-shapes"].iloc[0]
    assert row["trigger word"] == "zshape" and row["images"] >= 12 and row["captioned"] == row["images"]


def test_home_on_empty_home_says_how_to_start(zhome):
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    assert not at.exception
    assert any("zimage demo" in i.value for i in at.info)
