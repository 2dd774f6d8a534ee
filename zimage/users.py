"""Who is using the app, decided from plain values so the library never imports streamlit.

Pages pass `st.user.to_dict()` (filled only when Streamlit login is configured) and the name the person
typed once per browser session (kept in st.session_state["user_name"]); the login wins when present.
The CLI uses the OS user (`os_user`). What each of them may do is zimage.auth's business.
"""

from __future__ import annotations

import getpass
import os

from zimage.errors import UserError

# Claims tried in order: the e-mail is unique per person; the others are fallbacks of identity providers.
_LOGIN_CLAIMS = ("email", "preferred_username", "name", "sub")


class BadUserName(UserError):
    """A user name that cannot be recorded."""


def os_user() -> str:
    """The account running this process (the CLI's user)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return os.environ.get("USER") or f"uid{os.getuid()}"


def check_user_name(name: str) -> str:
    """A display name: 1-64 printable characters after trimming."""
    if not isinstance(name, str) or not name.strip():
        raise BadUserName("user name: must not be empty")
    name = name.strip()
    if len(name) > 64:
        raise BadUserName(f"user name: {name[:20]!r}... is longer than 64 characters")
    if not name.isprintable():
        raise BadUserName(f"user name: {name!r} contains control characters")
    return name


def resolve_user(logged_in: str | None = None, given: str | None = None) -> str | None:
    """The name to record: the login name when auth is configured, else the name the person gave.

    Returns None when neither is known, so the page can ask for a name before enqueueing.
    """
    for name in (logged_in, given):
        if name and str(name).strip():
            return check_user_name(str(name))
    return None


def login_name(st_user_info: dict | None) -> str | None:
    """The logged-in user's name from st.user's fields, or None when nobody is logged in."""
    if not st_user_info or st_user_info.get("is_logged_in") is not True:
        return None
    for claim in _LOGIN_CLAIMS:
        value = st_user_info.get(claim)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def current_user(st_user_info: dict | None, typed_name: str | None) -> str | None:
    """The name to record on a job: the login when there is one, else the typed name (checked), else None."""
    return resolve_user(login_name(st_user_info), typed_name)
