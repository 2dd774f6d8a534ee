"""Who started a run: the logged-in Streamlit user, a name given once per browser session, or the OS user.

The library only records the name it is given; pages decide where it comes from (`st.user` when login
is configured, else a text box) and pass it through `resolve_user`. The CLI uses the OS user.
"""

from __future__ import annotations

import getpass
import os

from zimage.errors import UserError


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
