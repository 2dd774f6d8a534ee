"""One damaged dataset.json harms only its own dataset: listings, the registry, the CLI and the pages go on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from zimage.data.folders import DamagedDataset, DatasetFolder
from zimage.data.manage import create_dataset, dataset_rows
from zimage.jobs import rebuild
from zimage.registry.db import Registry
from zimage.registry.ingest import Ingester

ROOT = Path(__file__).resolve().parents[1]
DAMAGE = [
    ("{not json", "not valid JSON"),
    ('{"resolution": "big"}', "resolution must be a whole number, got 'big'"),
    ('{"type": "portrait"}', "type input should be 'character', 'style' or 'concept'"),
    ("[]", "must hold a JSON object, found list"),
    ('{"resolution": 12}', "resolution input should be greater than or equal to 64"),
]


@pytest.fixture()
def home_with_damage(zhome):
    create_dataset(zhome, "good", trigger_word="zgood")
    create_dataset(zhome, "bad")
    return zhome


@pytest.mark.parametrize(("content", "problem"), DAMAGE)
def test_listing_shows_the_damaged_one_with_its_reason(home_with_damage, content, problem):
    (home_with_damage.datasets_dir / "bad" / "dataset.json").write_text(content)
    rows = {r["name"]: r for r in dataset_rows(home_with_damage)}
    assert rows["good"]["type"] == "character" and rows["good"]["problem"] == ""
    assert rows["bad"]["type"] == "damaged" and problem in rows["bad"]["problem"]
    assert rows["bad"]["problem"].startswith("dataset bad: dataset.json: ")
    with pytest.raises(DamagedDataset, match="dataset.json"):
        DatasetFolder(home_with_damage.datasets_dir / "bad").read_info()


def test_registry_scan_and_rebuild_keep_every_other_dataset(home_with_damage):
    (home_with_damage.datasets_dir / "bad" / "dataset.json").write_text("{not json")
    reg = Registry(home_with_damage.db_path)
    try:
        Ingester(reg, home_with_damage).scan()
        rows = dict(reg.fetch("SELECT name, coalesce(problem, '') FROM datasets"))
    finally:
        reg.close()
    assert rows["good"] == "" and "not valid JSON" in rows["bad"]
    counts = rebuild(home_with_damage)
    assert counts["datasets"] == 2


def test_cli_lists_datasets_despite_one_damaged(home_with_damage):
    (home_with_damage.datasets_dir / "bad" / "dataset.json").write_text('{"resolution": "big"}')
    env = {**os.environ, "ZIMAGE_HOME": str(home_with_damage.home)}
    out = subprocess.run([sys.executable, "-m", "zimage.cli", "datasets"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "good" in out.stdout and "damaged" in out.stdout and "resolution must be a whole number" in out.stdout


def test_pages_render_and_name_the_problem(home_with_damage, monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    (home_with_damage.datasets_dir / "bad" / "dataset.json").write_text('{"type": "portrait"}')
    home = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60).run()
    assert not home.exception
    assert any("dataset bad: dataset.json: type" in w.value for w in home.warning)
    page = AppTest.from_file(str(ROOT / "pages" / "1_Datasets.py"), default_timeout=60)
    page.session_state["dataset"] = "bad"
    page.run()
    assert not page.exception
    assert any("dataset bad: dataset.json: type" in e.value for e in page.error)
