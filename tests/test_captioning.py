"""The captioning worker on tiny random-weight BLIP and Florence-2 models built offline.

The captions are gibberish (random weights); the tests check the worker: which files it writes, what it
leaves alone, the progress and errors it reports, and that it honours stop / pause / resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from zimage.captioning.models import CaptionerError, captioner_rows, download_captioner, resolve_captioner
from zimage.captioning.tiny import write_tiny_blip, write_tiny_florence2
from zimage.captioning.worker import CaptionConfigError, caption_config, caption_runs, run_caption_job
from zimage.data.manage import create_dataset
from zimage.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_captioners(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("captioners")
    write_tiny_blip(base / "tiny-blip")
    write_tiny_florence2(base / "tiny-florence2")
    return {"blip": base / "tiny-blip", "florence2": base / "tiny-florence2"}


@pytest.fixture()
def dataset(zhome):
    folder = create_dataset(zhome, "pets", trigger_word="ohwx")
    for i, name in enumerate(["a.png", "b.png", "c.jpg", "d.png", "e.png"]):
        Image.new("RGB", (48 + 8 * i, 40), (40 * i, 90, 200 - 30 * i)).save(folder.images_dir / name)
    (folder.images_dir / "a.txt").write_text("keep me\n")
    (folder.images_dir / "bad.png").write_bytes(b"this is not an image")
    return folder


def start(zhome, name="run", **config) -> RunFolder:
    run = RunFolder(zhome.runs_dir / name)
    run.write_config(caption_config(**config))
    return run


def captions(folder) -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(folder.images_dir.glob("*.txt"))}


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run.path / "captions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["blip", "florence2"])
def test_worker_captions_selected_uncaptioned_images(zhome, dataset, tiny_captioners, family):
    run = start(zhome, dataset="pets", model=str(tiny_captioners[family]), images=["a.png", "b.png", "bad.png", "c.jpg"],
                mode="missing", batch_size=2, num_beams=1, max_new_tokens=8)  # fmt: skip
    assert run_caption_job(run.path) == 0
    caps = captions(dataset)
    assert set(caps) == {"a", "b", "c"}  # d, e not selected; bad unreadable
    assert caps["a"] == "keep me\n"  # captioned already: untouched in "missing" mode
    for stem in ("b", "c"):
        assert caps[stem].startswith("ohwx, ") and caps[stem].endswith("\n") and len(caps[stem].split()) > 1
    status = run.read_status()
    assert status["state"] == "completed" and status["kind"] == "caption" and status["pid"] == os.getpid()
    assert (status["step"], status["total_steps"], status["captioned"], status["error_count"]) == (3, 3, 2, 1)
    assert status["errors"] == [{"file": "bad.png", "error": "not an image PIL can decode"}]
    assert status["images_per_s"] > 0 and status["ended"] >= status["started"]
    assert {(r["file"], r["status"]) for r in records(run)} == {("b.png", "written"), ("c.jpg", "written"),
                                                                ("bad.png", "error")}  # fmt: skip
    metrics = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 3] and all(m["samples_per_s"] > 0 for m in metrics)
    assert not list(dataset.images_dir.glob(".*"))  # no temp files left behind


def test_overwrite_all_without_trigger(zhome, dataset, tiny_captioners):
    run = start(zhome, dataset="pets", model=str(tiny_captioners["blip"]), mode="all", trigger_prefix=False,
                detail="detailed", prompt="a photo of", num_beams=1, max_new_tokens=14)  # fmt: skip
    assert run_caption_job(run.path) == 0
    caps = captions(dataset)
    assert set(caps) == {"a", "b", "c", "d", "e"}
    assert all(c.startswith("a photo of") and "ohwx" not in c for c in caps.values())
    assert run.read_status()["step"] == 6 and run.read_status()["captioned"] == 5


def test_stop_pause_and_resume(zhome, dataset, tiny_captioners):
    run = start(zhome, dataset="pets", model=str(tiny_captioners["florence2"]), mode="all", batch_size=1,
                num_beams=1, max_new_tokens=4)  # fmt: skip
    states = []

    def on_progress(status):
        states.append(status["state"])
        if status.get("step") == 1 and "paused" not in states and not run.read_status().get("paused_once"):
            run.update_status(paused_once=True)
            run.send_control("pause")
            threading.Timer(0.8, run.send_control, args=("resume",)).start()
        if status.get("step") == 3:
            run.send_control("stop")

    assert run_caption_job(run.path, on_progress=on_progress) == 0
    status = run.read_status()
    # Step 3 is reported once batch 4 is already captioned (writes trail the model by one batch), and a stop
    # still writes the batch in hand: the run stops at 4 of 6, nothing captioned is thrown away.
    assert "paused" in states and status["state"] == "stopped" and status["step"] == 4
    assert [r["file"] for r in records(run)] == ["a.png", "b.png", "bad.png", "c.jpg"]
    first = set(captions(dataset))
    assert first == {"a", "b", "c"}
    # Resume (as requeue does): the new process skips the four files already done.
    run.retire_control()
    run.update_status(state="queued", resume=True)
    assert run_caption_job(run.path) == 0
    status = run.read_status()
    assert status["state"] == "completed" and status["total_steps"] == 2 and status["captioned"] == 2
    assert [r["file"] for r in records(run)] == ["a.png", "b.png", "bad.png", "c.jpg", "d.png", "e.png"]
    assert set(captions(dataset)) == {"a", "b", "c", "d", "e"}


def test_an_image_the_model_fails_on_is_reported_and_skipped(zhome, dataset, tiny_captioners, monkeypatch):
    from zimage.captioning import captioners, worker

    real = captioners.Captioner.caption

    def failing(self, images):  # fault injection: the model chokes on b.png's size (56x40)
        if any(im.size == (56, 40) for im in images):
            raise ValueError("cannot handle this one")
        return real(self, images)

    monkeypatch.setattr(captioners.Captioner, "caption", failing)
    run = start(zhome, dataset="pets", model=str(tiny_captioners["blip"]), mode="all", num_beams=1, max_new_tokens=4)
    assert run_caption_job(run.path) == 0
    status = run.read_status()
    assert status["state"] == "completed" and status["captioned"] == 4
    assert {e["file"]: e["error"] for e in status["errors"]} == {
        "b.png": "captioning failed: ValueError: cannot handle this one", "bad.png": "not an image PIL can decode",
    }  # fmt: skip
    assert (dataset.images_dir / "b.txt").exists() is False
    # A model that fails on everything ends the job as failed instead of reporting every image.
    monkeypatch.setattr(captioners.Captioner, "caption", lambda self, images: 1 / 0)
    monkeypatch.setattr(worker, "MAX_MODEL_FAILURES", 2)
    run = start(zhome, "broken", dataset="pets", model=str(tiny_captioners["blip"]), mode="all")
    assert run_caption_job(run.path) == 1
    status = run.read_status()
    assert status["state"] == "failed" and "ZeroDivisionError" in status["error"] and status["traceback"]


def test_cli_worker_in_a_subprocess(zhome, dataset, tiny_captioners):
    run = start(zhome, dataset="pets", model=str(tiny_captioners["blip"]), images=["d.png"], num_beams=1)
    env = {**os.environ, "ZIMAGE_HOME": str(zhome.home)}
    proc = subprocess.run([sys.executable, "-m", "zimage.cli", "caption", "--run-dir", str(run.path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    status = run.read_status()
    assert status["state"] == "completed" and status["pid"] != os.getpid() and status["captioned"] == 1
    assert (dataset.images_dir / "d.txt").read_text().startswith("ohwx")
    assert "captioning 1 image" in run.log_path.read_text()


def test_cli_captions_a_dataset_now(zhome, dataset, tiny_captioners, capsys):
    from zimage.cli import main

    code = main(["caption", "pets", "--model", str(tiny_captioners["blip"]), "--images", "e.png", "--no-trigger",
                 "--num-beams", "1", "--max-new-tokens", "6"])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["captioned"] == 1
    assert not (dataset.images_dir / "e.txt").read_text().startswith("ohwx")
    assert not list(zhome.runs_dir.iterdir())  # a direct run keeps its progress in a temp folder


def test_bad_config_fails_with_the_field_named(zhome, dataset):
    run = RunFolder(zhome.runs_dir / "bad")
    run.write_config({"dataset": "pets", "modle": "blip-base"})
    assert run_caption_job(run.path) == 1
    status = run.read_status()
    assert status["state"] == "failed" and "unknown key(s) modle" in status["error"] and not status.get("traceback")
    run = RunFolder(zhome.runs_dir / "missing-model")
    run.write_config(caption_config(dataset="pets", model="blip-base", download=False))
    assert run_caption_job(run.path) == 1
    assert "not downloaded yet" in run.read_status()["error"]
    for bad, field in ((dict(mode="some"), "mode"), (dict(detail="epic"), "detail"), (dict(batch_size=0), "batch_size"),
                       (dict(images="a.png"), "images")):  # fmt: skip
        with pytest.raises(CaptionConfigError if field != "detail" else Exception, match=field):
            caption_config(dataset="pets", **bad)
    run = start(zhome, "unknown-image", dataset="pets", images=["zzz.png"])
    assert run_caption_job(run.path) == 1 and "zzz.png" in run.read_status()["error"]
    assert captions(dataset) == {"a": "keep me\n"}


def test_captioner_catalogue_and_refusals(zhome, tiny_captioners, tmp_path):
    assert resolve_captioner(str(tiny_captioners["florence2"]), zhome) == ("florence2", tiny_captioners["florence2"])
    with pytest.raises(CaptionerError, match="florence-2-base is not downloaded yet"):
        resolve_captioner("microsoft/Florence-2-base", zhome)  # the remote-code repo maps to the native copy
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoModel": "x.Y"}}))
    (remote / "model.safetensors").write_bytes(b"")
    (remote / "preprocessor_config.json").write_text("{}")
    (remote / "tokenizer.json").write_text("{}")
    with pytest.raises(CaptionerError, match="ships its own Python code"):
        resolve_captioner(str(remote), zhome)
    (remote / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(CaptionerError, match="'llava' is not a supported captioner"):
        resolve_captioner(str(remote), zhome)
    with pytest.raises(CaptionerError, match="not a captioner name"):
        resolve_captioner("../../etc", zhome)
    with pytest.raises(CaptionerError, match="BLIP is not downloaded; run `zimage models download blip-base` where"):
        download_captioner("blip-base", zhome)  # HF_HUB_OFFLINE=1 in tests
    assert not (zhome.captioners_dir / "blip-base").exists() or not any((zhome.captioners_dir / "blip-base").iterdir())
    rows = {r["name"]: r for r in captioner_rows(zhome)}
    assert rows["florence-2-base"]["source"] == "florence-community/Florence-2-base"
    assert rows["blip-large"]["status"] == "not downloaded"


def test_enqueued_job_runs_and_is_listed(zhome, dataset, tiny_captioners):
    jobs = pytest.importorskip("zimage.jobs")
    config = caption_config(dataset="pets", model=str(tiny_captioners["blip"]), images=["e.png"], num_beams=1)
    run_id = jobs.enqueue(zhome, "caption", config, user="tester", name="caption pets")
    run_dir = zhome.runs_dir / run_id
    assert json.loads((run_dir / "config.json").read_text()) == config
    assert [r["run_id"] for r in caption_runs(zhome)] == [run_id]
    assert run_caption_job(run_dir) == 0
    status = RunFolder(run_dir).read_status()
    assert status["state"] == "completed" and status["user"] == "tester" and status["captioned"] == 1


def test_download_takes_safetensors_from_the_conversion_pr(zhome, tiny_captioners, monkeypatch):
    """The hub cannot be reached here, so it is faked at huggingface_hub's API boundary: main holds only a
    pickled .bin (like Salesforce/blip-image-captioning-base); the bot's conversion PR holds safetensors."""
    import shutil
    from types import SimpleNamespace

    import huggingface_hub

    calls = {}

    def fake_snapshot(repo_id, revision=None, local_dir=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, allow=allow_patterns)
        shutil.copytree(tiny_captioners["blip"], local_dir, dirs_exist_ok=True)

    pr = SimpleNamespace
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda self, repo: ["config.json", "pytorch_model.bin"]
    )
    monkeypatch.setattr(huggingface_hub.HfApi, "get_repo_discussions", lambda self, repo, **kw: iter([
        pr(num=7, title="Adding `safetensors` variant of this model"), pr(num=38, title="Adding `safetensors` variant of this model"),
        pr(num=40, title="Update README"),
    ]))  # fmt: skip
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr("zimage.captioning.models.hub_unreachable", lambda: "")  # the faked hub is reachable
    folder = download_captioner("blip-base", zhome)
    assert folder == zhome.captioners_dir / "blip-base" and calls["revision"] == "refs/pr/38"
    assert calls["repo_id"] == "Salesforce/blip-image-captioning-base" and "*.bin" not in calls["allow"]
    assert resolve_captioner("blip-base", zhome) == ("blip", folder)
    assert json.loads((folder / "zimage_captioner.json").read_text())["revision"] == "refs/pr/38"
    monkeypatch.setattr(huggingface_hub.HfApi, "get_repo_discussions", lambda self, repo, **kw: iter([]))
    with pytest.raises(CaptionerError, match="no safetensors weights"):
        download_captioner("blip-large", zhome)
