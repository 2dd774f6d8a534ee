"""One damaged checkpoint harms only itself: resume verifies each checkpoint's manifest, passes over a
damaged one (naming it in the run's log with its full path) and continues from the previous one."""

from __future__ import annotations

import json
import shutil

import pytest
from shared_cache import home_with_shared_cache
from train_support import fast_config, one_thread_per_module  # noqa: F401 - autouse

from zimage.cli import main
from zimage.config import build_config, validate_config
from zimage.runfolder import RunFolder
from zimage.training import checkpoints
from zimage.training.runner import run_training

STEPS, STOP_AT = 6, 4
CONFIG = dict(num_steps=STEPS, save_every_n_steps=2, keep_last_n_checkpoints=0, seed=3, output_name="fallback")


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir):
    return home_with_shared_cache(tmp_path_factory, tiny_model_dir, "fallback")


@pytest.fixture(autouse=True)
def _home_env(home, monkeypatch):
    monkeypatch.setenv("ZIMAGE_HOME", str(home.home))


@pytest.fixture(scope="module")
def stopped(home, tmp_path_factory):
    """A run stopped at step 4 with checkpoints at steps 2 and 4 (copied for each test)."""
    resolved = validate_config(build_config(fast_config(**CONFIG)), home)
    run = RunFolder(tmp_path_factory.mktemp("stopped") / "run")
    run.write_config(resolved.config.to_dict())

    def on_step(record):
        if record["step"] == STOP_AT:
            run.send_control("stop")

    assert run_training(resolved, home, run.path, on_step=on_step) == 0
    assert run.read_status()["state"] == "stopped"
    return run


@pytest.fixture
def run(stopped, tmp_path) -> RunFolder:
    shutil.copytree(stopped.path, tmp_path / "run")
    return RunFolder(tmp_path / "run")


def _newest(run: RunFolder):
    return run.checkpoints_dir / checkpoints.checkpoint_name(STOP_AT)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _garble(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # same size: only the hash can tell
    path.write_bytes(bytes(data))


def test_every_checkpoint_has_a_manifest_of_its_files(stopped):
    folder = stopped.checkpoints_dir / "step-000002"
    manifest = json.loads((folder / checkpoints.MANIFEST_FILE).read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    assert manifest["step"] == 2 and set(listed) == {"lora.safetensors", "resume_state.pt", "progress.json"}
    assert listed["lora.safetensors"]["size"] == (folder / "lora.safetensors").stat().st_size
    assert all(len(e["sha256"]) == 64 for e in listed.values())
    assert checkpoints.verify(folder) is None


@pytest.mark.parametrize(("damaged_file", "damage"), [("resume_state.pt", _truncate), ("lora.safetensors", _garble)])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(run, capsys, damaged_file, damage):
    damage(_newest(run) / damaged_file)
    report = checkpoints.checkpoint_report(run.checkpoints_dir)
    assert [(name, ok) for name, _step, ok, _why in report] == [("step-000002", True), ("step-000004", False)]
    assert str(_newest(run) / damaged_file) in report[1][3]

    assert main(["train", "--resume", str(run.path)]) == 0
    captured = capsys.readouterr()
    assert "resuming from step 2" in captured.out and str(_newest(run)) in captured.err
    status = run.read_status()
    assert status["state"] == "completed" and status["step"] == STEPS and status["resumed_from_step"] == 2
    log = run.log_path.read_text()
    assert f"Skipped checkpoint {_newest(run)}: {_newest(run) / damaged_file}" in log
    assert "Resumed from step-000002: continuing after step 2" in log


def test_checkpoints_without_a_manifest_follow_the_old_rule(run):
    for folder in run.checkpoints_dir.iterdir():
        (folder / checkpoints.MANIFEST_FILE).unlink()  # as written before manifests existed
    assert checkpoints.newest_checkpoint(run.checkpoints_dir).step == STOP_AT
    _truncate(_newest(run) / "resume_state.pt")  # today's "[Errno 22] Invalid argument" case
    why = checkpoints.verify(_newest(run))
    assert why.startswith(str(_newest(run) / "resume_state.pt")) and "cannot be read" in why
    assert main(["train", "--resume", str(run.path)]) == 0
    assert run.read_status()["resumed_from_step"] == 2
    assert f"Skipped checkpoint {_newest(run)}: {_newest(run) / 'resume_state.pt'}" in run.log_path.read_text()


def test_checkpoint_option_picks_an_older_one(run, capsys):
    assert main(["train", "--resume", str(run.path), "--checkpoint", "step-000002"]) == 0
    assert "resuming from step 2 (step-000002)" in capsys.readouterr().out
    status = run.read_status()
    assert status["state"] == "completed" and status["resumed_from_step"] == 2
    assert "Resumed from step-000002: continuing after step 2" in run.log_path.read_text()


def test_a_damaged_chosen_checkpoint_is_a_clear_error_and_changes_nothing(run, capsys):
    _truncate(_newest(run) / "resume_state.pt")
    before = run.status_path.read_bytes()
    assert main(["train", "--resume", str(run.path), "--checkpoint", "step-000004"]) == 2
    err = capsys.readouterr().err
    assert "--checkpoint step-000004 is damaged" in err and str(_newest(run) / "resume_state.pt") in err
    assert run.status_path.read_bytes() == before  # still the stopped run it was
    assert main(["train", "--resume", str(run.path), "--checkpoint", "step-000009"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_runs_show_lists_each_checkpoint_complete_or_damaged(home, stopped, capsys):
    run_id = "20261203-000000-fallback-show"
    target = home.runs_dir / run_id
    shutil.copytree(stopped.path, target)
    try:
        _truncate(target / "checkpoints" / checkpoints.checkpoint_name(STOP_AT) / "resume_state.pt")
        assert main(["runs", "show", run_id]) == 0
        out = capsys.readouterr().out
        assert "  step-000002  complete" in out
        assert "  step-000004  damaged: " in out and str(target / "checkpoints" / "step-000004") in out
    finally:
        shutil.rmtree(target)


def test_the_queue_resumes_from_a_chosen_checkpoint_and_refuses_a_damaged_one(home, stopped, capsys):
    from zimage.jobs import JobError, control
    from zimage.views.runs import NEWEST_CHECKPOINT, resume_choices

    run_id = "20261203-000001-fallback-queue"
    target = home.runs_dir / run_id
    shutil.copytree(stopped.path, target)
    try:
        _truncate(target / "checkpoints" / checkpoints.checkpoint_name(STOP_AT) / "resume_state.pt")
        with pytest.raises(JobError, match="step-000004 of run .* cannot be resumed from: .*resume_state.pt"):
            control(home, run_id, "resume", checkpoint="step-000004")
        with pytest.raises(JobError, match="has no checkpoint 'step-000009'"):
            control(home, run_id, "resume", checkpoint="step-000009")
        assert RunFolder(target).read_status()["state"] == "stopped"  # refused: nothing changed
        assert control(home, run_id, "resume", checkpoint="step-000002") == "requeued"
        assert RunFolder(target).read_status()["resume_checkpoint"] == "step-000002"
        assert main(["train", "--run-dir", str(target)]) == 0  # what the scheduler launches for the queued run
        assert "Resumed from step-000002: continuing after step 2" in (target / "log.txt").read_text()
        assert RunFolder(target).read_status()["state"] == "completed"
    finally:
        shutil.rmtree(target)
    import pandas as pd

    table = pd.DataFrame({"name": ["step-000002", "step-000004"], "step": [2, 4], "problem": [None, "bad"]})
    assert resume_choices(table) == [NEWEST_CHECKPOINT, "step-000002"]
    assert resume_choices(pd.DataFrame()) == [NEWEST_CHECKPOINT]
