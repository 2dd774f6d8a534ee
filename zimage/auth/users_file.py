"""The users file of password mode: `ZIMAGE_HOME/auth/users.json`, names, roles and argon2 hashes.

No password is ever stored: argon2-cffi's PasswordHasher (argon2id, salted, its default cost) makes
the hash and checks a login against it. The file is written atomically with mode 0600 under a lock,
so `zimage users add` from two shells never loses a user. The role of an OS user listed here also
decides what `zimage ... --as-admin` may do (zimage.auth.actors).
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field

from zimage.auth.roles import ROLES, check_role
from zimage.errors import UserError
from zimage.records import Damaged, Record, read_record
from zimage.settings import Settings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024


class UserEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(viewer|member|admin)$")
    password_hash: str = Field(pattern=r"^\$argon2")
    created: float = 0.0
    changed: float = 0.0


class UsersRecord(Record):
    version: int = 1
    users: dict[str, UserEntry] = Field(default_factory=dict)


def auth_dir(settings: Settings) -> Path:
    return settings.home / "auth"


def users_path(settings: Settings) -> Path:
    return auth_dir(settings) / "users.json"


def check_login_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name.strip()):
        raise UserError(
            f"user name: {str(name)[:40]!r} must be 1-64 letters, digits or . _ @ + - (starting with a letter or digit)"
        )
    return name.strip()


def check_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise UserError(f"password: must be at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UserError(f"password: is longer than {MAX_PASSWORD} characters")
    return password


def _hasher():
    try:
        from argon2 import PasswordHasher
    except ImportError:  # pragma: no cover - the [auth] extra is not installed
        raise UserError(
            "password mode needs argon2-cffi: pip install 'zimage-lora-studio[auth]' (or pip install argon2-cffi)"
        ) from None
    return PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher().hash(check_password(password))


def read_users(settings: Settings) -> dict[str, UserEntry]:
    """name -> entry; no file means no users. A damaged file is a UserError naming it (nobody can log in)."""
    rec = read_record(users_path(settings), UsersRecord, missing=UsersRecord())
    if isinstance(rec, Damaged):
        raise UserError(f"{users_path(settings)}: {rec.problem}; fix it or restore it from a backup")
    return dict(rec.users)


def role_of(settings: Settings, name: str) -> str | None:
    """The role of `name` in the users file, or None when the name is not listed (or there is no file)."""
    try:
        entry = read_users(settings).get(name)
    except UserError:
        return None
    return entry.role if entry is not None else None


@contextmanager
def _editing(settings: Settings):
    folder = auth_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / "users.lock", thread_local=False):
        users = read_users(settings)
        yield users
        _write(settings, users)


def _write(settings: Settings, users: dict[str, UserEntry]) -> None:
    from zimage.fsio import atomic_path

    data = UsersRecord(users=users).model_dump_json(indent=2) + "\n"
    with atomic_path(users_path(settings)) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(data)
        os.chmod(tmp, 0o600)  # hashes only, but nobody else needs to read them


def add_user(settings: Settings, name: str, password: str, role: str = "member") -> None:
    name, role = check_login_name(name), check_role(role)
    hashed = hash_password(password)
    with _editing(settings) as users:
        if name in users:
            raise UserError(f"user {name!r}: already exists (use `zimage users passwd` or `users role`)")
        now = time.time()
        users[name] = UserEntry(role=role, password_hash=hashed, created=now, changed=now)


def remove_user(settings: Settings, name: str) -> None:
    with _editing(settings) as users:
        if name not in users:
            raise UserError(f"user {name!r}: no such user in {users_path(settings)}")
        del users[name]


def set_password(settings: Settings, name: str, password: str) -> None:
    hashed = hash_password(password)
    with _editing(settings) as users:
        if name not in users:
            raise UserError(f"user {name!r}: no such user in {users_path(settings)}")
        users[name] = users[name].model_copy(update={"password_hash": hashed, "changed": time.time()})


def set_role(settings: Settings, name: str, role: str) -> None:
    role = check_role(role)
    with _editing(settings) as users:
        if name not in users:
            raise UserError(f"user {name!r}: no such user in {users_path(settings)}")
        users[name] = users[name].model_copy(update={"role": role, "changed": time.time()})


def verify_password(settings: Settings, name: str, password: str) -> str | None:
    """The user's role when `password` is theirs, else None (unknown name and wrong password alike).

    An unknown name still costs one hash, so timing does not tell which names exist.
    """
    from argon2.exceptions import InvalidHashError, VerificationError

    hasher = _hasher()
    entry = read_users(settings).get(name) if isinstance(name, str) else None
    if entry is None or not isinstance(password, str) or len(password) > MAX_PASSWORD:
        hasher.hash("not a user; keeps the timing the same")
        return None
    try:
        hasher.verify(entry.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    if hasher.check_needs_rehash(entry.password_hash):  # the library's cost went up: store the stronger hash
        try:
            set_password(settings, name, password)
        except UserError:
            pass
    return entry.role


__all__ = ["ROLES", "add_user", "read_users", "remove_user", "role_of", "set_password", "set_role", "verify_password"]
