"""Logging in: password checks with a lockout after repeated failures, sessions that expire, oidc roles.

Failed logins are counted per user name in `ZIMAGE_HOME/auth/logins.json` (under a lock, so every app
process and restart sees the same count): after `max_failed_logins` wrong passwords within
`lockout_minutes`, that name is refused for `lockout_minutes`, even with the right password. Every
attempt, right or wrong, is an event (`login`, done or refused).

A session is what a page keeps in st.session_state after a login: name, role, start and expiry. It is
checked on every page run (`session_actor`): expired, or the user removed from the users file, means
logged out; a changed role takes effect at once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from filelock import FileLock

from zimage.auth.roles import Actor
from zimage.auth.users_file import auth_dir, read_users, verify_password
from zimage.errors import UserError
from zimage.events import Event, record
from zimage.fsio import read_json, write_json
from zimage.settings import Settings


class LoginRefused(UserError):
    """A login that did not succeed; the message never says whether the name exists."""


@dataclass(frozen=True)
class Session:
    name: str
    role: str
    started: float
    expires: float

    def to_dict(self) -> dict:
        return asdict(self)


def _logins_path(settings: Settings):
    return auth_dir(settings) / "logins.json"


def _with_failures(settings: Settings, change):
    """Run `change(table)` on the failure table under its lock and save it; returns what `change` returns."""
    folder = auth_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / "logins.lock", thread_local=False):
        table = read_json(_logins_path(settings), default={})
        table = table if isinstance(table, dict) else {}
        out = change(table)
        write_json(_logins_path(settings), table)
    return out


def locked_for(settings: Settings, name: str, now: float | None = None) -> float:
    """Seconds until `name` may try again (0 when not locked)."""
    now = time.time() if now is None else now
    entry = (read_json(_logins_path(settings), default={}) or {}).get(name) or {}
    until = entry.get("locked_until") if isinstance(entry, dict) else None
    return max(0.0, float(until) - now) if isinstance(until, int | float) else 0.0


def login(settings: Settings, name: str, password: str, source: str = "ui", now: float | None = None) -> Session:
    """Check a password login; returns the Session or raises LoginRefused (recorded either way)."""
    auth = settings.home_settings().auth
    now = time.time() if now is None else now
    name = (name or "").strip()
    if not name or not password:
        raise LoginRefused("enter a user name and a password")
    wait = locked_for(settings, name, now)
    if wait > 0:
        msg = f"too many wrong passwords for {name}; try again in {max(1, round(wait / 60))} min"
        record(settings, Event(name, "", "login", f"user:{name}", source=source, result="refused", detail=msg))
        raise LoginRefused(msg)
    role = verify_password(settings, name, password)
    if role is None:
        window = auth.lockout_minutes * 60

        def fail(table: dict) -> bool:
            entry = table.get(name) if isinstance(table.get(name), dict) else {}
            recent = [t for t in entry.get("failures", []) if isinstance(t, int | float) and now - t < window]
            recent.append(now)
            entry = {"failures": recent[-auth.max_failed_logins :]}
            locked = len(recent) >= auth.max_failed_logins
            if locked:
                entry["locked_until"] = now + window
            table[name] = entry
            for other in [k for k, v in table.items() if k != name and _stale(v, now, window)]:
                del table[other]  # keep the file small: forget names with nothing recent
            return locked

        locked = _with_failures(settings, fail)
        detail = "wrong user name or password" + (
            f"; {name} is locked for {auth.lockout_minutes} min" if locked else ""
        )
        record(settings, Event(name, "", "login", f"user:{name}", source=source, result="refused", detail=detail))
        raise LoginRefused("wrong user name or password")
    _with_failures(settings, lambda table: table.pop(name, None))
    record(settings, Event(name, role, "login", f"user:{name}", source=source))
    return Session(name=name, role=role, started=now, expires=now + auth.session_minutes * 60)


def _stale(entry, now: float, window: float) -> bool:
    if not isinstance(entry, dict):
        return True
    newest = max((t for t in entry.get("failures", []) if isinstance(t, int | float)), default=0.0)
    return now - newest >= window and float(entry.get("locked_until") or 0) <= now


def session_actor(settings: Settings, session: dict | None, now: float | None = None) -> Actor | None:
    """The Actor of a page's stored session, or None when there is none, it expired, or the user is gone."""
    if not isinstance(session, dict):
        return None
    now = time.time() if now is None else now
    try:
        if float(session.get("expires", 0)) <= now:
            return None
        entry = read_users(settings).get(str(session.get("name")))
    except (TypeError, ValueError, UserError):
        return None
    if entry is None:
        return None
    return Actor(name=str(session["name"]), role=entry.role, source="ui", mode="password")


def logout(settings: Settings, session: dict | None) -> None:
    if isinstance(session, dict) and session.get("name"):
        record(settings, Event(str(session["name"]), str(session.get("role") or ""), "logout",
                               f"user:{session['name']}", source="ui"))  # fmt: skip


# -- oidc ---------------------------------------------------------------------------------------------
def oidc_role(settings: Settings, email: str) -> str | None:
    """The role of an oidc login from settings' [auth] roles (the e-mail first, then "@domain"), else the
    unknown-user policy: "viewer", or None when unknown users are refused."""
    auth = settings.home_settings().auth
    email = email.strip().lower()
    roles = {k.strip().lower(): v for k, v in auth.roles.items()}
    if email in roles:
        return roles[email]
    domain = "@" + email.rsplit("@", 1)[-1] if "@" in email else None
    if domain and domain in roles:
        return roles[domain]
    return "viewer" if auth.unknown_users == "viewer" else None


def oidc_actor(settings: Settings, user_info: dict | None) -> Actor | None:
    """The Actor of a logged-in st.user (its `email` claim), or None when nobody is logged in.

    Raises LoginRefused for a login the settings do not admit (unknown_users = "refuse")."""
    if not user_info or user_info.get("is_logged_in") is not True:
        return None
    email = user_info.get("email")
    if not isinstance(email, str) or "@" not in email:
        raise LoginRefused("this login carries no e-mail address; the studio names people by their e-mail")
    role = oidc_role(settings, email)
    if role is None:
        raise LoginRefused(f"{email} is not on this studio's list of users; ask an admin to add you")
    return Actor(name=email.strip().lower(), role=role, source="ui", mode="oidc")
