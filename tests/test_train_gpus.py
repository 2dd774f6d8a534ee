"""The Train page offers a GPU count only on a host with more than one GPU slot; the job keeps it."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from zimage.runfolder import RunFolder

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "3_Train.py")


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    monkeypatch.delenv("ZIMAGE_GPUS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


def test_one_gpu_host_offers_no_gpu_count(zhome_demo, monkeypatch):
    monkeypatch.setenv("ZIMAGE_GPUS", "0")
    at = AppTest.from_file(PAGE, default_timeout=90).run()
    assert not at.exception
    assert "tr_gpus" not in [w.key for w in at.number_input]


def test_two_gpu_host_queues_a_job_on_two_gpus(zhome_demo):
    (zhome_demo.home / "settings.toml").write_text('[scheduler]\ngpus = "0,1"\n')
    at = AppTest.from_file(PAGE, default_timeout=90).run()
    assert not at.exception
    field = at.number_input(key="tr_gpus")
    assert (field.value, field.max) == (1, 2)
    field.set_value(2).run()
    at.sidebar.text_input(key="user_name").input("alice")
    at.button(key="tr_launch").click().run()
    assert not at.exception
    (run,) = [RunFolder(p) for p in zhome_demo.runs_dir.iterdir() if not p.name.startswith(".")]
    status = run.read_status()
    assert (status["state"], status["gpus"]) == ("queued", 2)


def test_a_configured_cluster_launcher_is_offered_and_the_job_keeps_the_choice(zhome_demo):
    pytest.importorskip("submitit")
    at = AppTest.from_file(PAGE, default_timeout=90).run()
    assert "tr_backend" not in [w.key for w in at.selectbox]  # only this host: nothing to choose
    (zhome_demo.home / "settings.toml").write_text('[slurm]\nexecutor = "local"\npartition = "gpu"\n')
    at = AppTest.from_file(PAGE, default_timeout=90).run()
    assert not at.exception
    field = at.selectbox(key="tr_backend")
    assert (field.options, field.value) == (["local", "slurm"], "local")  # the home's launcher first
    field.set_value("slurm").run()
    at.sidebar.text_input(key="user_name").input("alice")
    at.button(key="tr_launch").click().run()
    assert not at.exception
    (run,) = [RunFolder(p) for p in zhome_demo.runs_dir.iterdir() if not p.name.startswith(".")]
    assert (run.read_status()["state"], run.read_status()["backend"]) == ("queued", "slurm")
