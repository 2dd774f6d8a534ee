"""Roles and ownership enforced in the library and the CLI (zimage.auth): a member controls only their
own runs and datasets, an admin anyone's, a viewer nothing; every attempt is recorded; mode none refuses
nothing. Real run folders, real dataset folders, the real `zimage` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_uploads import png_bytes
from zimage.auth import Actor, PermissionDenied, can, cli_actor, require
from zimage.data import manage
from zimage.data.uploads import add_files
from zimage.events import EVENTS_FILE, home_events_path, read_events
from zimage.jobs import control, delete_run, enqueue, move_up
from zimage.runfolder import RunFolder

TRAIN = {"output_name": "cat", "num_steps": 2}
ALICE, BOB = Actor("alice", "member", "ui"), Actor("bob", "member", "ui")
ADMIN, VIEWER = Actor("root-admin", "admin", "ui"), Actor("val", "viewer", "ui")


@pytest.fixture()
def team(zhome):
    zhome.settings_path.write_text('[auth]\nmode = "password"\n')
    return zhome


def events(settings):
    return [(e.user, e.action, e.result) for e in read_events(home_events_path(settings))]


def test_the_rule_names_the_owner():
    require(ALICE, "control", "alice")
    require(ADMIN, "delete", "bob")
    with pytest.raises(PermissionDenied, match="run r1 is owned by alice; bob \\(member\\) may only change their own"):
        require(BOB, "control", "alice", what="run r1")
    with pytest.raises(PermissionDenied, match="val is a viewer"):
        require(VIEWER, "create")
    assert not can(BOB, "users") and can(ADMIN, "settings") and can(BOB, "create")
    with pytest.raises(PermissionDenied, match="owned by nobody on record"):
        require(BOB, "edit", None)


def test_member_cannot_stop_another_members_run_owner_and_admin_can(team):
    run_id = enqueue(team, "train", TRAIN, user="someone-else", actor=ALICE)
    folder = RunFolder(team.runs_dir / run_id)
    assert folder.read_status()["user"] == "alice"  # the signed-in name, not what the caller typed
    folder.update_status(state="running")
    with pytest.raises(PermissionDenied, match=f"run {run_id} is owned by alice"):
        control(team, run_id, "stop", actor=BOB)
    assert folder.read_control() == []  # nothing was sent
    with pytest.raises(PermissionDenied, match="viewer"):
        control(team, run_id, "pause", actor=VIEWER)
    assert control(team, run_id, "pause", actor=ALICE) == "pause requested"
    assert control(team, run_id, "stop", actor=ADMIN) == "stop requested"
    assert [(r["action"], r["user"]) for r in folder.read_control()] == [("pause", "alice"), ("stop", "root-admin")]
    expected = [("alice", "train.launch", "done"), ("bob", "run.stop", "refused"), ("val", "run.pause", "refused"),
                ("alice", "run.pause", "done"), ("root-admin", "run.stop", "done")]  # fmt: skip
    assert events(team) == expected
    in_run = [(e.user, e.action, e.result) for e in read_events(folder.path / EVENTS_FILE)]
    assert in_run == expected  # the run's own record holds the same lines
    refused = read_events(home_events_path(team))[1]
    assert refused.owner == "alice" and refused.role == "member" and refused.source == "ui"
    assert f"run {run_id} is owned by alice" in refused.detail and refused.target == f"run:{run_id}"


def test_failed_requests_reorder_and_delete_are_recorded_too(team):
    a = enqueue(team, "train", TRAIN, actor=ALICE)
    b = enqueue(team, "train", TRAIN, actor=BOB)
    with pytest.raises(PermissionDenied):
        move_up(team, b, actor=ALICE)
    assert move_up(team, b, actor=BOB) == 0
    with pytest.raises(PermissionDenied):
        delete_run(team, a, actor=BOB)
    with pytest.raises(Exception, match="needs a running run"):
        control(team, a, "pause", actor=ALICE)  # allowed, but the run is queued: failed, with the reason
    delete_run(team, a, actor=ADMIN)
    assert not (team.runs_dir / a).exists()
    assert events(team)[2:] == [("alice", "run.move", "refused"), ("bob", "run.move", "done"),
                                ("bob", "run.delete", "refused"), ("alice", "run.pause", "failed"),
                                ("root-admin", "run.delete", "done")]  # fmt: skip
    viewer_launch = pytest.raises(PermissionDenied, match="viewer")
    with viewer_launch:
        enqueue(team, "train", TRAIN, actor=VIEWER)


def test_datasets_belong_to_who_made_them(team):
    folder = manage.create_dataset(team, "cats", actor=ALICE, trigger_word="ohwx")
    assert json.loads(folder.info_path.read_text())["owner"] == "alice"
    add_files(folder, [("a.png", png_bytes())], actor=ALICE)
    for call in (
        lambda: manage.update_dataset(team, "cats", actor=BOB, trigger_word="x"),
        lambda: manage.write_caption(folder, "a.png", "a cat", actor=BOB),
        lambda: add_files(folder, [("b.png", png_bytes())], actor=BOB),
        lambda: manage.bulk_edit_captions(folder, prefix="p", include_uncaptioned=True, actor=BOB),
        lambda: manage.delete_images(folder, ["a.png"], actor=BOB),
        lambda: manage.delete_dataset(team, "cats", actor=BOB),
    ):
        with pytest.raises(PermissionDenied, match="dataset cats is owned by alice"):
            call()
    preview = manage.bulk_edit_captions(folder, prefix="p", include_uncaptioned=True, dry_run=True, actor=BOB)
    assert len(preview) == 1 and not (folder.images_dir / "a.txt").exists()  # a preview changes nothing
    manage.write_caption(folder, "a.png", "a cat", actor=ALICE)
    manage.update_dataset(team, "cats", actor=ADMIN, trigger_word="sks")
    manage.delete_dataset(team, "cats", actor=ADMIN)
    got = events(team)
    assert got[:2] == [("alice", "dataset.create", "done"), ("alice", "dataset.upload", "done")]
    assert [r for _, _, r in got[2:8]] == ["refused"] * 6  # the preview is not an action
    assert got[8:] == [("alice", "dataset.caption.edit", "done"), ("root-admin", "dataset.edit", "done"),
                       ("root-admin", "dataset.delete", "done")]  # fmt: skip


def test_mode_none_refuses_nothing_and_records_everything(zhome):
    run_id = enqueue(zhome, "train", TRAIN, user="ann")
    RunFolder(zhome.runs_dir / run_id).update_status(state="running")
    assert control(zhome, run_id, "stop", user="someone") == "stop requested"
    assert events(zhome) == [("ann", "train.launch", "done"), ("someone", "run.stop", "done")]
    assert read_events(home_events_path(zhome))[0].role == "admin"


def zimage(settings, *args):
    env = {**os.environ, "ZIMAGE_HOME": str(settings.home)}
    return subprocess.run([sys.executable, "-m", "zimage.cli", *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="the CLI acts as root here; another account needs its own test")
def test_cli_stop_of_another_users_run_needs_as_admin_and_is_recorded(team):
    run_id = enqueue(team, "train", TRAIN, actor=ALICE)
    RunFolder(team.runs_dir / run_id).update_status(state="running")
    refused = zimage(team, "runs", "stop", run_id)
    assert refused.returncode == 2
    assert f"error: run {run_id} is owned by alice; root (member) may only change their own" in refused.stderr
    assert "--as-admin" in refused.stderr
    done = zimage(team, "runs", "stop", run_id, "--as-admin")
    assert done.returncode == 0 and f"{run_id}: stop requested" in done.stdout
    last = read_events(home_events_path(team))[-2:]
    assert [(e.user, e.role, e.result, e.as_admin, e.source) for e in last] == [
        ("root", "member", "refused", False, "cli"), ("root", "admin", "done", True, "cli")]  # fmt: skip


def test_as_admin_needs_the_admin_role_in_the_users_file(team, monkeypatch):
    """A non-root OS user (this process as uid 4242, named by the password database) may pass --as-admin
    only with the admin role in the users file."""
    import pwd

    from zimage.auth import users_file

    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: type("P", (), {"pw_name": "carol"})())
    monkeypatch.setenv("USER", "root")  # $USER does not decide who the CLI is
    assert cli_actor(team) == Actor("carol", "member", "cli", mode="password")
    with pytest.raises(PermissionDenied, match="the OS user carol does not hold the admin role"):
        cli_actor(team, as_admin=True)
    users_file.add_user(team, "carol", "a long password", "admin")
    assert cli_actor(team, as_admin=True).role == "admin" and cli_actor(team).role == "member"
