"""The queue in the run folders: enqueue, order, move, cancel, requeue, delete, users, GPU slots."""

import json
import os

import pytest
from train_support import fast_config

from zimage.captioning.config import caption_config
from zimage.jobs import JobError, cancel, control, delete_run, enqueue, move_down, move_up, requeue, resolve_user
from zimage.jobs.queue import check_run_id, queued_runs
from zimage.jobs.slots import SlotConfig, SlotConfigError, assign, slot_config
from zimage.jobs.users import BadUserName, os_user
from zimage.runfolder import ControlRequests, RunFolder

CAPTION = caption_config(dataset="pets", model="blip-base")  # valid configs: nothing here launches them
TRAIN = fast_config()


def _order(settings):
    return [rid for rid, _ in queued_runs(settings)]


def test_enqueue_writes_config_and_queued_status(zhome):
    run_id = enqueue(zhome, "train", {"output_name": "My LoRA", "num_steps": 5}, user="ann")
    check_run_id(run_id)
    assert run_id.split("-")[2:4] == ["my", "lora"]
    folder = RunFolder(zhome.runs_dir / run_id)
    assert json.loads(folder.config_path.read_text()) == {"output_name": "My LoRA", "num_steps": 5}
    status = folder.read_status()
    assert status["state"] == "queued" and status["kind"] == "train" and status["user"] == "ann"
    assert status["name"] == "My LoRA" and status["gpus"] == 1 and status["created"] > 0
    assert sorted(p.name for p in zhome.runs_dir.iterdir()) == [run_id]  # no hidden temp folder left
    # the CLI's user when none is given
    other = enqueue(zhome, "caption", CAPTION, name="x")
    assert RunFolder(zhome.runs_dir / other).read_status()["user"] == os_user()


def test_enqueue_refuses_bad_input_without_leaving_files(zhome):
    with pytest.raises(JobError, match="kind: 'bake' is not a job kind"):
        enqueue(zhome, "bake", {})
    with pytest.raises(JobError, match="config: must be a mapping"):
        enqueue(zhome, "train", ["not", "a", "dict"])
    with pytest.raises(JobError, match="gpus: 0 must be"):
        enqueue(zhome, "train", {}, gpus=0)
    with pytest.raises(BadUserName, match="control characters"):
        enqueue(zhome, "train", {}, user="bad\x00name")
    with pytest.raises(JobError, match="config: cannot be saved as JSON"):
        enqueue(zhome, "train", {"x": object()})
    assert list(zhome.runs_dir.iterdir()) == []


def test_fifo_order_move_up_down_and_cancel(zhome):
    a, b, c = (enqueue(zhome, kind, config, name=n) for n, kind, config in
               (("a", "train", TRAIN), ("b", "caption", CAPTION), ("c", "train", TRAIN)))  # fmt: skip
    assert _order(zhome) == [a, b, c]
    assert move_up(zhome, c) == 1
    assert _order(zhome) == [a, c, b]
    assert move_up(zhome, c) == 0 and move_up(zhome, c) == 0  # already first: stays
    assert _order(zhome) == [c, a, b]
    assert move_down(zhome, c) == 1
    assert _order(zhome) == [a, c, b]
    d = enqueue(zhome, "caption", CAPTION, name="d")  # new jobs go to the end, even after moves
    assert _order(zhome) == [a, c, b, d]
    cancel(zhome, c)
    assert _order(zhome) == [a, b, d]
    status = RunFolder(zhome.runs_dir / c).read_status()
    assert status["state"] == "stopped" and status["cancelled"] is True
    with pytest.raises(JobError, match="not in the queue"):
        move_up(zhome, c)
    with pytest.raises(JobError, match="is stopped, not queued"):
        cancel(zhome, c)
    # stop on a queued job cancels it too
    assert control(zhome, d, "stop") == "cancelled"
    assert _order(zhome) == [a, b]


def test_control_needs_the_right_state(zhome):
    run_id = enqueue(zhome, "caption", CAPTION)
    with pytest.raises(JobError, match="is queued; pause needs a running run"):
        control(zhome, run_id, "pause")
    with pytest.raises(JobError, match="action: 'explode'"):
        control(zhome, run_id, "explode")
    with pytest.raises(JobError, match="no such run"):
        control(zhome, "20260101-000000-nope-0000", "stop")
    with pytest.raises(JobError, match="is not a run id"):
        control(zhome, "../../etc", "stop")
    folder = RunFolder(zhome.runs_dir / run_id)
    folder.update_status(state="running", pid=os.getpid())
    assert control(zhome, run_id, "pause", user="ann") == "pause requested"
    (pause,) = json.loads(folder.control_path.read_text())["requests"]
    assert (pause["action"], pause["user"]) == ("pause", "ann") and pause["id"] and pause["at"] > 0
    assert control(zhome, run_id, "save_now") == "save_now requested"
    assert control(zhome, run_id, "stop") == "stop requested"
    assert [r["action"] for r in folder.read_control()] == ["pause", "save_now", "stop"]
    with pytest.raises(JobError, match="is running; stop it before deleting"):
        delete_run(zhome, run_id)


def test_resume_of_a_finished_run_requeues_it_and_the_old_stop_no_longer_acts(zhome):
    first, second = enqueue(zhome, "train", TRAIN), enqueue(zhome, "train", TRAIN)
    folder = RunFolder(zhome.runs_dir / first)
    folder.update_status(state="running")
    stop = folder.send_control("stop")
    folder.update_status(state="stopped", ended=1.0)  # its worker died before it saw the stop
    assert control(zhome, first, "resume", user="bob") == "requeued"
    status = folder.read_status()
    assert status["state"] == "queued" and status["resume"] is True and status["resumes"] == 1
    assert status["requeued_by"] == "bob" and status["ended"] is None
    assert folder.handled_control() == [stop["id"]] and folder.read_control() == [stop]  # kept, as handled
    assert RunFolder(folder.path).poll_control() == ControlRequests()  # the resumed worker is not stopped
    assert _order(zhome) == [second, first]  # back of the line
    folder.update_status(state="completed")
    with pytest.raises(JobError, match="only stopped, failed or lost"):
        requeue(zhome, first)


def test_delete_removes_the_folder(zhome):
    run_id = enqueue(zhome, "caption", CAPTION)
    RunFolder(zhome.runs_dir / run_id).update_status(state="completed")
    delete_run(zhome, run_id)
    assert list(zhome.runs_dir.iterdir()) == []
    with pytest.raises(JobError, match="no such run"):
        delete_run(zhome, run_id)


def test_user_names():
    assert resolve_user("ann@example.com", "typed") == "ann@example.com"
    assert resolve_user(None, "  bob ") == "bob"
    assert resolve_user(None, "   ") is None and resolve_user() is None
    with pytest.raises(BadUserName, match="longer than 64"):
        resolve_user(None, "x" * 65)
    assert os_user()


def test_gpu_slots(monkeypatch):
    cpu = SlotConfig()
    assert cpu.capacity == 1 and assign(cpu, []) == [] and assign(cpu, [""]) is None
    two = SlotConfig(("0", "1"), jobs_per_gpu=2)
    assert two.capacity == 4
    assert assign(two, []) == ["0"]
    assert assign(two, ["0"]) == ["1"]  # least loaded first
    assert assign(two, ["0", "1", "0"]) == ["1"]
    assert assign(two, ["0", "1", "0", "1"]) is None
    assert assign(two, ["0"], need=2) == ["0", "1"]
    assert assign(two, ["0", "0"], need=2) is None
    monkeypatch.setenv("ZIMAGE_GPUS", "2,3")
    monkeypatch.setenv("ZIMAGE_JOBS_PER_GPU", "3")
    assert slot_config() == SlotConfig(("2", "3"), 3)
    monkeypatch.setenv("ZIMAGE_GPUS", "none")
    assert slot_config().gpu_ids == ()
    monkeypatch.delenv("ZIMAGE_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert slot_config().gpu_ids == ("1",)
    monkeypatch.setenv("ZIMAGE_GPUS", "0,x")
    with pytest.raises(SlotConfigError, match="ZIMAGE_GPUS: 'x'"):
        slot_config()
    monkeypatch.setenv("ZIMAGE_GPUS", "0")
    monkeypatch.setenv("ZIMAGE_JOBS_PER_GPU", "many")
    with pytest.raises(SlotConfigError, match="ZIMAGE_JOBS_PER_GPU"):
        slot_config()
