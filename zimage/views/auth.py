"""Who is using a page: the login form (password), st.login (oidc) or the typed name / OS user (none).

Pages call `page_actor(st, settings)` right after set_page_config and pass the Actor it returns to every
library call that changes something. It is given the page's `st` module (this package imports no
streamlit). In password and oidc mode it shows the login and stops the page until someone is signed in;
the sidebar then says who is signed in, with a Log out button. `control_state` says whether a control
is enabled for that actor and, when not, why ("owned by bob").
"""

from __future__ import annotations

from zimage.auth import Actor, why_not
from zimage.auth.logins import LoginRefused, login, logout, oidc_actor, session_actor
from zimage.settings import Settings
from zimage.users import login_name, os_user, resolve_user

SESSION_KEY = "auth_session"


def page_actor(st, settings: Settings) -> Actor:
    """The Actor of this browser session; in password/oidc mode the page stops here until one signs in."""
    mode = settings.home_settings().auth.mode
    if mode == "password":
        return _password_actor(st, settings)
    if mode == "oidc":
        return _oidc_actor(st, settings)
    remember_name(st)
    info = st.user.to_dict()
    name = resolve_user(login_name(info), st.session_state.get("user_name")) or os_user()
    return Actor(name=name, role="admin", source="ui", mode="none")


NAME_COOKIE = "zimage_user"  # mode none: the name a person gave, kept by their browser (never in the URL)


def remember_name(st, days: int = 365) -> None:
    """Mode none: bring back the name this browser gave before (a cookie, read through st.context.cookies)
    and store a newly typed one with extra-streamlit-components' CookieManager. Runs before the name box.

    The cookie is written by a component in the browser, which may load only after the page has run
    again (the manager's own cookie read asks for a rerun; a busy server makes the frame slow). So the
    setter is drawn on every run until the browser answers that it has set the cookie: a frame dropped
    before it loaded would never set it."""
    from urllib.parse import unquote

    ss = st.session_state
    saved = st.context.cookies.get(NAME_COOKIE) if st.context.cookies is not None else None
    if saved and not ss.get("user_name"):
        try:
            ss["user_name"] = resolve_user(None, unquote(saved))
        except Exception:  # a cookie that is not a name (edited by hand): ignore it
            pass
    typed = ss.get("user_name")
    if not typed or typed == (unquote(saved) if saved else None) or ss.get("_name_cookie_set") == typed:
        return
    try:
        import extra_streamlit_components as stx
    except ImportError:  # optional: without it the name lasts for the browser session
        return
    import datetime as dt
    import hashlib

    pending = ss.get("_name_cookie_pending")
    if not pending or pending[0] != typed:  # one expiry per name: the setter's arguments stay the same
        expires = (dt.datetime.now() + dt.timedelta(days=days)).isoformat()
        pending = ss["_name_cookie_pending"] = (typed, expires)
    options = {"path": "/", "expires": pending[1], "sameSite": "strict"}
    key = "zimage_cookie_set_" + hashlib.sha1(typed.encode()).hexdigest()[:12]  # a fresh frame per name
    with st.sidebar:  # not in the main area: an element there would shift the page's tabs and expanders
        manager = stx.CookieManager(key="zimage_cookies")
        done = manager.cookie_manager(method="set", cookie=NAME_COOKIE, value=typed, options=options, key=key,
                                      default=False)  # fmt: skip
    if done:  # the browser has written it
        ss["_name_cookie_set"] = typed
        ss.pop("_name_cookie_pending", None)


def _signed_in(st, actor: Actor, on_logout) -> Actor:
    st.sidebar.caption(f"Signed in as **{actor.name}** ({actor.role})")
    if st.sidebar.button("Log out", key="auth_logout"):
        on_logout()
    st.session_state["user_name"] = actor.name  # pages that record a name record the signed-in one
    return actor


def _password_actor(st, settings: Settings) -> Actor:
    ss = st.session_state
    session = ss.get(SESSION_KEY)
    actor = session_actor(settings, session)
    if actor is not None:

        def out() -> None:
            logout(settings, ss.pop(SESSION_KEY, None))
            ss.pop("user_name", None)
            st.rerun()

        return _signed_in(st, actor, out)
    if session is not None:
        ss.pop(SESSION_KEY, None)
        st.info("Your session has ended (expired, or your account changed). Sign in again.")
    st.subheader("Sign in")
    with st.form("auth_login"):
        name = st.text_input("User name", key="auth_name")
        password = st.text_input("Password", type="password", key="auth_password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        try:
            ss[SESSION_KEY] = login(settings, name, password, source="ui").to_dict()
            st.rerun()
        except LoginRefused as exc:
            st.error(str(exc))
    st.stop()
    raise AssertionError("st.stop() returned")  # pragma: no cover


def _oidc_actor(st, settings: Settings) -> Actor:
    provider = settings.home_settings().auth.oidc_provider
    try:
        actor = oidc_actor(settings, st.user.to_dict())
    except LoginRefused as exc:
        st.error(str(exc))
        if st.button("Log out", key="auth_logout"):
            st.logout()
        st.stop()
        raise AssertionError("st.stop() returned") from None  # pragma: no cover
    if actor is None:
        st.subheader("Sign in")
        st.caption("This studio signs people in through the team's identity provider.")
        if st.button("Sign in", key="auth_login_oidc"):
            st.login(provider) if provider else st.login()
        st.stop()
        raise AssertionError("st.stop() returned")  # pragma: no cover
    return _signed_in(st, actor, st.logout)


def control_state(actor: Actor, verb: str, owner: str | None, what: str = "") -> tuple[bool, str | None]:
    """(enabled, reason): whether `actor` may `verb` a thing of `owner`, and if not why, for a tooltip."""
    reason = why_not(actor, verb, owner, what)
    return reason is None, reason


def events_rows(df) -> list[dict]:
    """registry events as table rows for the timeline and the admin view (time as text)."""
    from zimage.views.format import clock

    return [
        {"when": clock(r.time), "who": r.user_name, "role": r.role, "what": r.action, "target": r.target,
         "result": r.result, "from": r.source + (" (--as-admin)" if r.as_admin else ""), "detail": r.detail}
        for r in df.itertuples(index=False)
    ]  # fmt: skip


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_warning(mode: str, address: str | None) -> str | None:
    """The banner for a home without logins whose server listens beyond this machine, else None.

    `address` is Streamlit's server.address (None: Streamlit's default, every interface)."""
    if mode != "none" or (address or "").strip() in LOOPBACK:
        return None
    where = f"on {address}" if address else "on every network interface"
    return (f"This studio listens {where} and has no login: anyone who can reach it can start, stop and delete "
            "runs. Bind it to 127.0.0.1 (the README's start command) or set [auth] mode in settings.toml.")  # fmt: skip


def show_activity(st, settings: Settings, actor: Actor) -> None:
    """Home: the exposure banner, and for admins of a team home the latest events with filters."""
    mode = settings.home_settings().auth.mode
    if warning := exposure_warning(mode, st.get_option("server.address")):
        st.warning(warning)
    if mode == "none" or not actor.is_admin:
        return
    from zimage.registry.events import events
    from zimage.views import open_registry

    with st.expander("Activity (admins): every action, refused ones too"):
        c1, c2 = st.columns(2)
        who = c1.text_input("User", key="activity_user").strip() or None
        refused = c2.toggle("Only refused", key="activity_refused")
        rows = events_rows(events(open_registry(settings), user=who, result="refused" if refused else None))
        st.dataframe(rows, hide_index=True, key="activity_table") if rows else st.caption("Nothing recorded yet.")
