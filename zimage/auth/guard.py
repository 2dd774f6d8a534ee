"""Who a call acts for when nobody says, and the one wrapper that checks and records an action.

- `cli_actor(settings, as_admin)`: the CLI acts as the OS user. Its role is the users file's role for
  that name (an OS user not listed is a member: they can already write their own files on the host);
  root counts as admin. Without `--as-admin` an admin acts as a member, so touching someone else's run
  from a shell is always a deliberate, recorded choice.
- `default_actor(settings, actor, user)`: what a library call without `actor=` acts as — in mode `none`
  the given name (or the OS user) with every right; otherwise the CLI's OS user, never more.
- `checked(settings, actor, action, target, owner, folder)`: a context manager that calls `require`
  and appends one event (done, refused or failed) to events.jsonl, in the home and `folder`.
- `audited(action, locate)`: the same as a decorator for library functions; it takes an `actor=` keyword
  off the call. A call made inside another checked call is not checked or recorded again.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from zimage.auth.roles import Actor, PermissionDenied, require
from zimage.errors import UserError
from zimage.events import Event, record
from zimage.settings import Settings

_inside: contextvars.ContextVar[Actor | None] = contextvars.ContextVar("zimage_auth_inside", default=None)


def auth_mode(settings: Settings) -> str:
    return settings.home_settings().auth.mode


def cli_actor(settings: Settings, as_admin: bool = False) -> Actor:
    """The OS user running the CLI, with the role the users file gives that name (see the module doc)."""
    from zimage.auth.users_file import role_of
    from zimage.users import os_user

    name, mode = os_user(), auth_mode(settings)
    if mode == "none":
        return Actor(name=name, role="admin", source="cli", as_admin=as_admin, mode=mode)
    name = account_name()  # not $USER: a shell may set that to anything
    listed = "admin" if os.geteuid() == 0 else (role_of(settings, name) or "member")
    if as_admin and listed != "admin":
        raise PermissionDenied(
            f"--as-admin: the OS user {name} does not hold the admin role in the users file "
            f"({settings.home / 'auth' / 'users.json'}); an admin can grant it with `zimage users role {name} admin`"
        )
    role = "admin" if as_admin else ("viewer" if listed == "viewer" else "member")
    return Actor(name=name, role=role, source="cli", as_admin=as_admin, mode=mode)


def account_name() -> str:
    """The name of the account this process runs as (its effective uid), from the password database."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # no passwd entry (some containers)
        return f"uid{os.geteuid()}"


def default_actor(settings: Settings, actor: Actor | None = None, user: str | None = None) -> Actor:
    """`actor` when given; else, in mode none, `user` (or the OS user) with every right; else the CLI's."""
    if actor is not None:
        if not isinstance(actor, Actor):
            raise UserError(f"actor: expected a zimage.auth.Actor, got {type(actor).__name__}")
        return actor
    inside = _inside.get()
    if inside is not None:
        return inside
    if auth_mode(settings) == "none":
        from zimage.users import check_user_name, os_user

        name = check_user_name(user) if user is not None and str(user).strip() else os_user()
        return Actor(name=name, role="admin", source="cli", mode="none")
    if threading.current_thread().name.startswith("ScriptRunner"):  # a page that forgot to say who acts
        raise PermissionDenied("no signed-in user was given for this action; sign in again (or report the page)")
    return cli_actor(settings)


@contextmanager
def checked(
    settings: Settings, actor: Actor, action: str, target: str = "", owner: str | None = None,
    folder: Path | None = None, what: str = "", verb: str | None = None,
) -> Iterator[dict]:  # fmt: skip
    """Check `actor` may do `verb` (default: `action`, an event name such as "dataset.edit" whose last part
    is the verb), run the block, and record `action` with how it ended. The block may set
    `note["detail"]` (what was done), `note["folder"]` (where the event also goes, e.g. a new run) and
    `note["target"]` (e.g. the id of the run it made)."""
    note: dict = {"detail": "", "folder": folder, "target": target}

    def event(result: str, detail: str) -> None:
        ev = Event(actor.name, actor.role, action, note["target"], owner=owner, source=actor.source, result=result,
                   detail=detail, as_admin=actor.as_admin)  # fmt: skip
        try:
            record(settings, ev, note["folder"])
        except OSError:  # a full disk must not turn a refusal into a traceback; the caller still sees it
            pass

    try:
        require(actor, verb or action, owner, what or target.replace(":", " ", 1))
    except PermissionDenied as exc:
        event("refused", str(exc))
        raise
    token = _inside.set(actor)
    try:
        yield note
    except Exception as exc:  # the request itself went wrong (a UserError says why; anything else by its type)
        event("failed", str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
        raise
    finally:
        _inside.reset(token)
    event("done", note["detail"])


Locate = Callable[..., tuple[Settings, str, str | None, Path | None]]


def audited(action: str, locate: Locate, unless: Callable[..., bool] | None = None, verb: str | None = None):
    """Decorate a library function: `locate(*args, **kwargs)` returns (settings, target, owner, folder) of
    the thing it changes; the call takes an optional `actor=` keyword (see default_actor). A call for
    which `unless(*args, **kwargs)` is true changes nothing (a preview) and is neither checked nor recorded.
    `verb` is the permission checked when the action's last part is not one (e.g. "…undo" is an "edit")."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, actor: Actor | None = None, **kwargs):
            if (actor is None and _inside.get() is not None) or (unless is not None and unless(*args, **kwargs)):
                return fn(*args, **kwargs)  # part of a call that is already checked and recorded, or a preview
            settings, target, owner, folder = locate(*args, **kwargs)
            who = default_actor(settings, actor)
            with checked(settings, who, action, target, owner, folder, verb=verb) as note:
                out = fn(*args, **kwargs)
                note["detail"] = _summary(out)
            return out

        return inner

    return wrap


def _summary(out) -> str:
    summary = getattr(out, "summary", None)
    if callable(summary):
        return str(summary())
    if isinstance(out, list):
        return f"{len(out)} item(s)"
    return ""


def acting() -> Actor | None:
    """The actor of the checked call this code runs inside (e.g. to record a new dataset's owner)."""
    return _inside.get()
