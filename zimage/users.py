"""Who is using the app, decided from plain values so the library never imports streamlit.

Pages pass `st.user.to_dict()` (filled only when Streamlit login is configured) and the name the person
typed once per browser session (kept in st.session_state["user_name"]); the login wins when present.
"""

from __future__ import annotations

from zimage.jobs.users import resolve_user

# Claims tried in order: the e-mail is unique per person; the others are fallbacks of identity providers.
_LOGIN_CLAIMS = ("email", "preferred_username", "name", "sub")


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
