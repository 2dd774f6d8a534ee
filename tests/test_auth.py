"""Password mode's users file and logins (zimage.auth): hashes only, lockout after wrong passwords,
sessions that expire, the CLI's `zimage users`, and oidc roles from settings."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import pytest

from zimage.auth import users_file
from zimage.auth.logins import LoginRefused, login, oidc_actor, session_actor
from zimage.errors import UserError
from zimage.events import home_events_path, read_events

PASSWORD = "correct horse battery"


def set_auth(settings, text: str) -> None:
    settings.settings_path.write_text("[auth]\n" + text + "\n")


@pytest.fixture()
def pw_home(zhome):
    set_auth(zhome, 'mode = "password"\nsession_minutes = 60')
    users_file.add_user(zhome, "alice", PASSWORD, "member")
    users_file.add_user(zhome, "root-admin", "another long secret", "admin")
    return zhome


def test_users_file_holds_hashes_not_passwords_and_is_private(pw_home):
    path = users_file.users_path(pw_home)
    raw = path.read_text()
    assert PASSWORD not in raw and "another long secret" not in raw
    data = json.loads(raw)["users"]
    assert data["alice"]["role"] == "member" and data["alice"]["password_hash"].startswith("$argon2id$")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert users_file.verify_password(pw_home, "alice", PASSWORD) == "member"
    assert users_file.verify_password(pw_home, "alice", "wrong password") is None
    assert users_file.verify_password(pw_home, "nobody-here", PASSWORD) is None
    with pytest.raises(UserError, match="already exists"):
        users_file.add_user(pw_home, "alice", PASSWORD)
    with pytest.raises(UserError, match="at least 8"):
        users_file.add_user(pw_home, "bob", "short")
    with pytest.raises(UserError, match="user name"):
        users_file.add_user(pw_home, "../evil", PASSWORD)


def test_five_wrong_passwords_lock_the_name_even_for_the_right_one(pw_home):
    now = 1_000_000.0
    for i in range(5):
        with pytest.raises(LoginRefused, match="wrong user name or password"):
            login(pw_home, "alice", f"wrong-{i}-password", now=now + i)
    with pytest.raises(LoginRefused, match="too many wrong passwords for alice; try again in 15 min"):
        login(pw_home, "alice", PASSWORD, now=now + 10)
    # another name is not affected; after the lockout the right password works again and clears the count
    assert login(pw_home, "root-admin", "another long secret", now=now + 10).role == "admin"
    session = login(pw_home, "alice", PASSWORD, now=now + 5 + 15 * 60)
    assert session.name == "alice" and session.expires == session.started + 3600
    logins = [(e.user, e.result) for e in read_events(home_events_path(pw_home)) if e.action == "login"]
    assert logins == [("alice", "refused")] * 6 + [("root-admin", "done"), ("alice", "done")]
    assert "locked for 15 min" in [e.detail for e in read_events(home_events_path(pw_home))][4]


def test_sessions_expire_and_follow_the_users_file(pw_home):
    s = login(pw_home, "alice", PASSWORD, now=2_000_000.0).to_dict()
    actor = session_actor(pw_home, s, now=2_000_000.0 + 59 * 60)
    assert actor.name == "alice" and actor.role == "member" and actor.source == "ui"
    assert session_actor(pw_home, s, now=2_000_000.0 + 61 * 60) is None  # expired
    users_file.set_role(pw_home, "alice", "viewer")
    assert session_actor(pw_home, s, now=2_000_000.0 + 60).role == "viewer"  # a new role counts at once
    users_file.remove_user(pw_home, "alice")
    assert session_actor(pw_home, s, now=2_000_000.0 + 60) is None  # removed: logged out


def test_oidc_roles_from_emails_and_domains_unknown_users_viewer_or_refused(zhome):
    set_auth(zhome, 'mode = "oidc"\nroles = { "boss@corp.example" = "admin", "@corp.example" = "member" }')
    logged = {"is_logged_in": True}
    assert oidc_actor(zhome, {"is_logged_in": False}) is None
    assert oidc_actor(zhome, {**logged, "email": "Boss@corp.example"}).role == "admin"
    assert oidc_actor(zhome, {**logged, "email": "ann@corp.example"}).role == "member"
    assert oidc_actor(zhome, {**logged, "email": "eve@else.example"}).role == "viewer"
    set_auth(zhome, 'mode = "oidc"\nunknown_users = "refuse"\nroles = { "@corp.example" = "member" }')
    with pytest.raises(LoginRefused, match="eve@else.example is not on this studio's list"):
        oidc_actor(zhome, {**logged, "email": "eve@else.example"})
    with pytest.raises(LoginRefused, match="no e-mail"):
        oidc_actor(zhome, {**logged, "name": "No Mail"})


def test_auth_settings_are_checked_by_field(zhome):
    from zimage.settings import SettingsFileError

    set_auth(zhome, 'mode = "ldap"')
    with pytest.raises(SettingsFileError, match="auth.mode"):
        zhome.home_settings()


def cli(settings, *args, stdin: str = ""):
    return subprocess.run([sys.executable, "-m", "zimage.cli", *args], input=stdin, capture_output=True, text=True,
                          env={"ZIMAGE_HOME": str(settings.home), "PATH": "/usr/bin:/bin"}, timeout=120)  # fmt: skip


def test_cli_users_add_reads_the_password_from_stdin_list_passwd_remove(zhome):
    set_auth(zhome, 'mode = "password"')
    out = cli(zhome, "users", "add", "carol", "--role", "admin", stdin="a long password\n")
    assert out.returncode == 0, out.stderr
    assert users_file.verify_password(zhome, "carol", "a long password") == "admin"
    listing = cli(zhome, "users", "list").stdout
    assert "carol" in listing and "admin" in listing and "auth mode: password" in listing
    assert cli(zhome, "users", "passwd", "carol", stdin="a newer password\n").returncode == 0
    assert users_file.verify_password(zhome, "carol", "a newer password") == "admin"
    bad = cli(zhome, "users", "add", "dave", stdin="")
    assert bad.returncode == 2 and "standard input is empty" in bad.stderr
    assert cli(zhome, "users", "remove", "carol").returncode == 0
    assert users_file.read_users(zhome) == {}
    actions = [(e.action, e.target, e.result) for e in read_events(home_events_path(zhome))]
    assert actions == [("user.add", "user:carol", "done"), ("user.passwd", "user:carol", "done"),
                       ("user.remove", "user:carol", "done")]  # fmt: skip
