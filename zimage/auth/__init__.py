"""Who may do what: auth modes, roles, ownership checks and the record of every action.

The one call every feature that changes something makes first (pages, CLI and library alike):

    from zimage.auth import require, PermissionDenied
    require(actor, "delete", owner="bob", what="LoRA cat-v1")   # raises PermissionDenied naming the owner

`checked(settings, actor, action, target, owner, folder)` does the same and appends the event (done,
refused or failed) to events.jsonl; `audited(...)` is that as a decorator. Modes (settings.toml [auth]):
`none` — one person, everyone acts as themselves with every right (ownership is recorded, nothing is
refused); `password` — the users file (`zimage users add`), a login form, lockout after failures;
`oidc` — Streamlit's st.login, roles from settings.

    roles.py       Actor, ROLES, VERBS, require / can / why_not, PermissionDenied
    users_file.py  the users file (argon2 hashes), add / remove / passwd / role
    logins.py      password logins with lockout, sessions that expire, oidc roles
    guard.py       cli_actor (--as-admin), default_actor, checked, audited
"""

from zimage.auth.guard import acting, audited, auth_mode, checked, cli_actor, default_actor
from zimage.auth.roles import ROLES, VERBS, Actor, PermissionDenied, can, require, why_not

__all__ = [
    "ROLES",
    "VERBS",
    "Actor",
    "PermissionDenied",
    "acting",
    "audited",
    "auth_mode",
    "can",
    "checked",
    "cli_actor",
    "default_actor",
    "require",
    "why_not",
]
