"""Roles and the one permission rule every control function applies (`require`).

- viewer: sees everything, changes nothing.
- member: creates datasets and runs; controls, deletes and edits only what they own.
- admin:  does all of it to anyone's, and manages users and settings.

An `Actor` is the person a call acts for: a name, a role, where the request came from (ui or cli), and
for the CLI whether `--as-admin` was given (recorded on the event). In auth mode `none` every actor is
an admin of a one-person home: ownership is recorded on every run and dataset, and nothing is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from zimage.errors import UserError

ROLES = ("viewer", "member", "admin")
# Who may do each verb: "member" (any member, e.g. make a new run), "owner" (a member on their own
# things) or "admin". Viewers do none of them; admins do all of them.
VERBS = {
    "create": "member", "control": "owner", "delete": "owner", "edit": "owner", "reorder": "owner",
    "upload": "owner", "users": "admin", "settings": "admin",
}  # fmt: skip


class PermissionDenied(UserError):
    """The acting user may not do this; the message says who owns the thing and who may."""


@dataclass(frozen=True)
class Actor:
    name: str
    role: str = "member"
    source: str = "cli"  # ui | cli
    as_admin: bool = False  # the CLI's --as-admin (an admin acting on someone else's run or dataset)
    mode: str = "none"  # the home's auth mode when the actor was made

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UserError(f"role: {self.role!r} is not one of {', '.join(ROLES)}")
        if self.source not in ("ui", "cli"):
            raise UserError(f"source: {self.source!r} must be ui or cli")

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    return role


def why_not(actor: Actor, action: str, owner: str | None = None, what: str = "") -> str | None:
    """None when `actor` may do `action` to a thing owned by `owner`; otherwise the reason, for people.

    `action` is one of VERBS, or a dotted event name ending in one ("dataset.edit"). `what` names the
    thing ("run 20261203-...-cat-1a2b").
    """
    verb = action.rsplit(".", 1)[-1]
    if verb not in VERBS:
        raise UserError(f"action: {action!r} is not one of {', '.join(VERBS)}")
    if actor.is_admin:
        return None
    if actor.role == "viewer":
        return f"{actor.name} is a viewer: viewers can look at everything but change nothing"
    need = VERBS[verb]
    if need == "member" or (need == "owner" and owner and owner == actor.name):
        return None
    if need == "admin":
        return f"only an admin may manage {verb}; {actor.name} is a {actor.role}"
    thing = what or "this"
    who = f"owned by {owner}" if owner else "owned by nobody on record (made before logins were on)"
    hint = "an admin can, or an admin's --as-admin from the CLI" if actor.source == "cli" else "an admin can"
    return f"{thing} is {who}; {actor.name} ({actor.role}) may only change their own ({hint})"


def can(actor: Actor, action: str, owner: str | None = None) -> bool:
    return why_not(actor, action, owner) is None


def require(actor: Actor, action: str, owner: str | None = None, what: str = "") -> None:
    """Raise PermissionDenied (naming the owner) unless `actor` may do `action` to a thing of `owner`.

    The one check pages, the CLI and the library call before changing a run, dataset, LoRA or user:

        require(actor, "delete", owner="bob", what="LoRA cat-v1")
    """
    reason = why_not(actor, action, owner, what)
    if reason is not None:
        raise PermissionDenied(reason)
