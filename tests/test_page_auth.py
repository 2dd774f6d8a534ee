"""AppTest of the sign-in and of ownership on the Runs, Datasets and LoRAs pages in password and oidc mode: a member cannot
stop another member's run (the control is off in the page and the library refuses), the owner and an
admin can, every attempt lands in events.jsonl and on the run's timeline, a viewer sees no enabled control."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from zimage.auth import Actor, PermissionDenied, users_file
from zimage.auth.logins import login
from zimage.events import EVENTS_FILE, home_events_path, read_events
from zimage.jobs import control
from zimage.runfolder import RunFolder, process_start_time

ROOT = Path(__file__).resolve().parents[1]
RUNS = str(ROOT / "pages" / "4_Runs.py")
CONTROLS = ("run_stop", "run_pause", "run_resume", "run_save_now", "run_sample_now")


@pytest.fixture(autouse=True)
def no_scheduler_launch(monkeypatch):
    monkeypatch.setenv("ZIMAGE_SCHEDULER_LAUNCH", "0")
    yield
    from zimage.jobs.scheduler import stop_all

    stop_all()


@pytest.fixture()
def team(zhome):
    zhome.settings_path.write_text('[auth]\nmode = "password"\n')
    for name, role in (("alice", "member"), ("bob", "member"), ("boss", "admin"), ("val", "viewer")):
        users_file.add_user(zhome, name, f"{name}-password", role)
    rf = RunFolder(zhome.runs_dir / "r-alice")
    rf.write_config({"dataset_path": "demo-shapes", "output_name": "r-alice", "model_path": "tiny-zimage"})
    me = os.getpid()  # a live "worker", so the scheduler does not mark the run lost
    rf.update_status(state="running", kind="train", user="alice", name="r-alice", created=time.time(), step=3,
                     total_steps=10, pid=me, pid_start_time=process_start_time(me), heartbeat=time.time())  # fmt: skip
    return zhome


def page(settings, who: str | None) -> AppTest:
    at = AppTest.from_file(RUNS, default_timeout=90)
    at.query_params["run"] = "r-alice"
    if who:
        at.session_state["auth_session"] = login(settings, who, f"{who}-password").to_dict()
    return at.run()


def enabled(at) -> dict[str, bool]:
    return {b.key: not b.disabled for b in at.button if b.key in CONTROLS}


def test_nobody_signed_in_sees_only_the_form_and_a_wrong_password_is_refused(team):
    at = page(team, None)
    assert not at.exception and [s.value for s in at.subheader] == ["Sign in"]
    assert not [b for b in at.button if b.key in CONTROLS] and not at.dataframe  # no run, no table
    at.text_input(key="auth_name").input("bob")
    at.text_input(key="auth_password").input("not bob's")
    at.button[0].click().run()
    assert [e.value for e in at.error] == ["wrong user name or password"]
    at.text_input(key="auth_password").input("bob-password")
    at.button[0].click().run()
    assert not at.exception and "Signed in as **bob** (member)" in [c.value for c in at.sidebar.caption]
    at.button(key="auth_logout").click().run()
    assert [s.value for s in at.subheader] == ["Sign in"]
    assert [(e.user, e.action, e.result) for e in read_events(home_events_path(team))][-3:] == [
        ("bob", "login", "refused"), ("bob", "login", "done"), ("bob", "logout", "done")]  # fmt: skip


def test_member_cannot_stop_another_members_run_owner_and_admin_can(team):
    bob = page(team, "bob")
    assert not bob.exception
    assert not any(enabled(bob).values())  # every control off for bob ...
    assert any("owned by alice" in c.value for c in bob.caption)  # ... with the reason
    with pytest.raises(PermissionDenied, match="run r-alice is owned by alice"):
        control(team, "r-alice", "stop", actor=Actor("bob", "member", "ui"))  # ... and the library refuses
    alice = page(team, "alice")
    assert enabled(alice) == {"run_stop": True, "run_pause": True, "run_resume": False, "run_save_now": True,
                              "run_sample_now": True}  # fmt: skip
    alice.button(key="run_pause").click().run()
    assert any("pause requested" in t.value for t in alice.toast)
    boss = page(team, "boss")
    assert enabled(boss)["run_stop"]
    boss.button(key="run_stop").click().run()
    assert any("stop requested" in t.value for t in boss.toast)
    actions = [r["action"] for r in RunFolder(team.runs_dir / "r-alice").read_control()]
    assert actions == ["pause", "stop"]
    in_run = [(e.user, e.action, e.result) for e in read_events(team.runs_dir / "r-alice" / EVENTS_FILE)]
    assert in_run == [("bob", "run.stop", "refused"), ("alice", "run.pause", "done"), ("boss", "run.stop", "done")]
    (timeline,) = [d.value for d in page(team, "boss").dataframe if "who" in d.value.columns]
    assert list(zip(timeline["who"], timeline["what"], timeline["result"], strict=True)) == in_run


def test_a_viewer_sees_no_enabled_control(team):
    val = page(team, "val")
    assert not val.exception and enabled(val) and not any(enabled(val).values())
    assert any("val is a viewer" in c.value for c in val.caption)


def test_an_expired_session_asks_to_sign_in_again(team):
    at = AppTest.from_file(RUNS, default_timeout=90)
    session = login(team, "alice", "alice-password").to_dict()
    at.session_state["auth_session"] = {**session, "expires": time.time() - 1}
    at.run()
    assert [s.value for s in at.subheader] == ["Sign in"] and "session has ended" in at.info[0].value


def test_oidc_login_names_the_user_by_email_and_maps_the_role(team):
    team.settings_path.write_text('[auth]\nmode = "oidc"\nroles = { "alice@corp.example" = "member" }\n'
                                  'unknown_users = "refuse"\n')  # fmt: skip
    RunFolder(team.runs_dir / "r-alice").update_status(user="alice@corp.example")
    at = AppTest.from_file(RUNS, default_timeout=90)
    at.query_params["run"] = "r-alice"
    at.user = {"is_logged_in": False}
    at.run()
    assert [s.value for s in at.subheader] == ["Sign in"] and at.button(key="auth_login_oidc")
    at.user = {"is_logged_in": True, "email": "alice@corp.example", "name": "Alice"}
    at.run()
    assert not at.exception and "Signed in as **alice@corp.example** (member)" in [c.value for c in at.sidebar.caption]
    assert enabled(at)["run_stop"]
    at.user = {"is_logged_in": True, "email": "eve@else.example"}
    at.run()
    assert "eve@else.example is not on this studio's list" in at.error[0].value and not enabled(at)


@pytest.mark.parametrize("page_file", ["Home.py", "pages/1_Datasets.py", "pages/2_Captioning.py", "pages/3_Train.py",
                                       "pages/5_Compare.py"])  # fmt: skip
def test_every_page_asks_for_a_sign_in_then_shows_who_is_signed_in(team, page_file):
    at = AppTest.from_file(str(ROOT / page_file), default_timeout=120).run()
    assert not at.exception and "Sign in" in [s.value for s in at.subheader]
    assert not at.text_input(key="auth_name").value
    at = AppTest.from_file(str(ROOT / page_file), default_timeout=120)
    at.session_state["auth_session"] = login(team, "boss", "boss-password").to_dict()
    at.run()
    assert not at.exception, at.exception
    assert "Signed in as **boss** (admin)" in [c.value for c in at.sidebar.caption]
    assert "user_name" not in [t.key for t in at.sidebar.text_input]  # no name box: the sign-in names people


def test_admins_see_every_action_on_home_members_do_not(team):
    with pytest.raises(PermissionDenied):
        control(team, "r-alice", "stop", actor=Actor("bob", "member", "ui"))
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=120)
    at.session_state["auth_session"] = login(team, "boss", "boss-password").to_dict()
    at.run()
    (table,) = [d.value for d in at.dataframe if "who" in d.value.columns]
    assert ("bob", "run.stop", "refused") in set(zip(table["who"], table["what"], table["result"], strict=True))
    at.toggle(key="activity_refused").set_value(True).run()
    (table,) = [d.value for d in at.dataframe if "who" in d.value.columns]
    assert set(table["result"]) == {"refused"}
    member = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=120)
    member.session_state["auth_session"] = login(team, "alice", "alice-password").to_dict()
    member.run()
    assert not member.exception and not [d for d in member.dataframe if "who" in d.value.columns]


def signed_in(page_file: str, settings, who: str, **query) -> AppTest:
    at = AppTest.from_file(str(ROOT / page_file), default_timeout=120)
    at.query_params.update(query)
    at.session_state["auth_session"] = login(settings, who, f"{who}-password").to_dict()
    return at.run()


def test_datasets_and_loras_pages_grey_what_only_the_owner_or_an_admin_may_do(team):
    from test_loras_library import trained_lora
    from test_uploads import png_bytes

    from zimage.data import manage
    from zimage.data.uploads import add_files

    alice = Actor("alice", "member", "ui")
    folder = manage.create_dataset(team, "cats", actor=alice, trigger_word="ohwx")
    add_files(folder, [("a.png", png_bytes())], actor=alice)
    keys = ("caption_save", "upload_add", "bulk_apply", "settings_save", "delete_ds")
    for who, may in (("bob", False), ("alice", True), ("boss", True)):
        at = signed_in("pages/1_Datasets.py", team, who, dataset="cats")
        assert not at.exception, at.exception
        buttons = {b.key: b for b in at.button if b.key in keys}
        assert set(buttons) == set(keys) and buttons["caption_save"].disabled is not may, who
        off = any("Changes are off: dataset cats is owned by alice" in c.value for c in at.caption)
        assert off is not may, who
        if not may:  # every change is off, each with the reason as its tooltip
            assert all(b.disabled and "owned by alice" in (b.help or "") for b in buttons.values())

    trained_lora(team, name="alices", user="alice")
    for who, may in (("bob", False), ("alice", True), ("boss", True)):
        at = signed_in("pages/6_LoRAs.py", team, who, lora="alices")
        assert not at.exception, at.exception
        delete = at.button(key="loras_delete")
        assert delete.disabled is not may, who
        if not may:
            assert "LoRA alices is owned by alice" in delete.help
