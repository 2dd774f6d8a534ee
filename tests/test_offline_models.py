"""Offline honesty: a captioner that is not here fails at once with what to do, one in the Hugging Face cache
is used from there, `zimage models list|download` covers captioners and base models, and the demo home
captions a dataset offline with its tiny random-weight BLIP through the real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants
from PIL import Image

from zimage.captioning.models import CaptionerError, captioner_rows, check_captioner, resolve_captioner
from zimage.captioning.tiny import DEMO_CAPTIONER, DEMO_CAPTIONER_TITLE, write_tiny_blip
from zimage.captioning.worker import caption_config, run_caption_job
from zimage.cli import main
from zimage.data.manage import create_dataset
from zimage.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = (
    "BLIP is not downloaded; run `zimage models download blip-base` where there is network, or set HF_HOME to a "
    "cache that has it"
)


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for the worker subprocesses too
    return cache


@pytest.fixture()
def pets(zhome):
    folder = create_dataset(zhome, "pets", trigger_word="ohwx")
    for i in range(3):
        Image.new("RGB", (48, 40), (60 * i, 90, 200)).save(folder.images_dir / f"{i}.png")
    return folder


def caption_run(zhome, name: str, **config) -> RunFolder:
    run = RunFolder(zhome.runs_dir / name)
    run.write_config(caption_config(dataset="pets", num_beams=1, max_new_tokens=6, **config))
    return run


def test_offline_host_fails_at_once_with_what_to_do(zhome, pets, empty_cache):
    assert constants.HF_HUB_OFFLINE  # tests/conftest.py: HF_HUB_OFFLINE=1
    with pytest.raises(CaptionerError, match="BLIP is not downloaded; run `zimage models download blip-base`"):
        check_captioner("blip-base", zhome, allow_download=True)  # the page refuses before queueing
    run = caption_run(zhome, "offline", model="blip-base")
    assert run_caption_job(run.path) == 1
    status = run.read_status()
    assert status["state"] == "failed" and status["error"].startswith(MESSAGE), status["error"]
    assert "HF_HUB_OFFLINE is set" in status["error"] and not status.get("traceback")
    assert not (zhome.captioners_dir / "blip-base").exists()  # nothing half-made


def test_a_host_without_network_fails_from_one_probe_not_the_hubs_retries(zhome, pets, empty_cache, monkeypatch):
    # No HF_HUB_OFFLINE, and a hub address where nothing listens: the one connection attempt says so. A hub
    # call would have answered with huggingface_hub's own error after its retries, not this message.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    run = caption_run(zhome, "no-network", model="blip")  # "blip" is blip-base
    assert run_caption_job(run.path) == 1
    error = run.read_status()["error"]
    assert error.startswith(MESSAGE) and "127.0.0.1:9 cannot be reached from this host" in error


def fill_hub_cache(cache: Path, repo_id: str) -> Path:
    """A hub-cache entry laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_tiny_blip(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_a_captioner_in_the_hub_cache_is_used_from_there(zhome, pets, empty_cache):
    snapshot = fill_hub_cache(empty_cache, "Salesforce/blip-image-captioning-base")
    assert resolve_captioner("blip-base", zhome) == ("blip", snapshot)
    rows = {r["name"]: r for r in captioner_rows(zhome)}
    assert rows["blip-base"]["status"].startswith("ready (HF cache")
    assert rows["blip-large"]["status"] == "not downloaded"
    run = caption_run(zhome, "from-cache", model="blip-base", download=False)
    assert run_caption_job(run.path) == 0, run.read_status().get("error")
    assert run.read_status()["captioned"] == 3


def test_models_list_and_download(zhome, empty_cache, capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "BASE MODELS" in out and "z-image-turbo" in out
    assert "CAPTIONERS" in out and "blip-base" in out and "florence-2-base" in out
    assert main(["models"]) == 0 and "CAPTIONERS" in capsys.readouterr().out  # list is the default action
    assert main(["models", "download", "blip"]) == 2
    assert MESSAGE in capsys.readouterr().err
    assert main(["models", "download", "z-image-turbo"]) == 2  # base models still download through the catalogue
    assert "cannot reach the Hugging Face Hub" in capsys.readouterr().err


def test_the_demo_home_captions_offline_with_its_tiny_blip(zhome, empty_cache, capsys):
    from zimage import jobs

    assert main(["demo"]) == 0
    assert DEMO_CAPTIONER_TITLE in capsys.readouterr().out  # labelled as what it is
    folder = zhome.captioners_dir / DEMO_CAPTIONER
    assert json.loads((folder / "zimage_captioner.json").read_text())["title"] == DEMO_CAPTIONER_TITLE
    rows = {r["name"]: r for r in captioner_rows(zhome)}
    assert rows[DEMO_CAPTIONER]["status"] == "ready" and "random weights" in rows[DEMO_CAPTIONER]["model"]
    images = zhome.datasets_dir / "demo-shapes" / "images"
    before = {p.name: p.read_text() for p in images.glob("*.txt")}
    config = caption_config(dataset="demo-shapes", model=check_captioner(DEMO_CAPTIONER, zhome), mode="all",
                            images=["001.png", "002.png"], num_beams=1, max_new_tokens=6)  # fmt: skip
    run_id = jobs.enqueue(zhome, "caption", config, user="ann", name="caption-demo")
    run = RunFolder(zhome.runs_dir / run_id)
    env = {**os.environ, "ZIMAGE_HOME": str(zhome.home)}
    proc = subprocess.run([sys.executable, "-m", "zimage.cli", "caption", "--run-dir", str(run.path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    status = run.read_status()
    assert status["state"] == "completed" and status["captioned"] == 2, status
    after = {p.name: p.read_text() for p in images.glob("*.txt")}
    assert after["001.txt"] != before["001.txt"] and after["001.txt"].startswith("zshape, ")
    assert after["003.txt"] == before["003.txt"]  # not chosen: untouched
