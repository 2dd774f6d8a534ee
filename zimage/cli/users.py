"""`zimage users add|list|remove|passwd|role`: the users file of password mode (zimage.auth).

The password comes from a prompt (asked twice) or, when standard input is not a terminal, from its
first line, for scripts: `printf '%s\\n' "$PW" | zimage users add alice --role member`. Managing users
needs the admin role: an OS user listed as admin in the users file, or root; while the file holds no
admin yet (first setup) anyone who can write the home may add the first one. Every change is an event.
"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("users", help="users and roles of password mode (add, list, remove, passwd, role)")
    usub = p.add_subparsers(dest="users_command", metavar="ACTION")
    a = usub.add_parser("add", help="add a user; the password is asked for (or read from stdin)")
    a.add_argument("name")
    a.add_argument("--role", default="member", choices=("viewer", "member", "admin"))
    a.set_defaults(handler=run_add)
    ls = usub.add_parser("list", help="users and their roles")
    ls.set_defaults(handler=run_list)
    r = usub.add_parser("remove", help="remove a user")
    r.add_argument("name")
    r.set_defaults(handler=run_remove)
    pw = usub.add_parser("passwd", help="set a user's password")
    pw.add_argument("name")
    pw.set_defaults(handler=run_passwd)
    ro = usub.add_parser("role", help="change a user's role")
    ro.add_argument("name")
    ro.add_argument("role", choices=("viewer", "member", "admin"))
    ro.set_defaults(handler=run_role)
    p.set_defaults(handler=run_list)


def read_password(stdin=None, prompt=None) -> str:
    """From a prompt (twice, must match) on a terminal; else the first line of standard input."""
    from zimage.errors import UserError

    stdin = stdin or sys.stdin
    if stdin.isatty():
        import getpass

        first = (prompt or getpass.getpass)("password: ")
        if first != (prompt or getpass.getpass)("again: "):
            raise UserError("password: the two entries differ; nothing changed")
        return first
    line = stdin.readline()
    if not line:
        raise UserError("password: standard input is empty (pipe the password in, one line)")
    return line.rstrip("\r\n")


def _admin(settings):
    """The acting OS user as an admin; refused unless root, listed as admin, or no admin exists yet."""
    from zimage.auth import Actor, cli_actor
    from zimage.auth.users_file import read_users

    users = read_users(settings)
    if not any(u.role == "admin" for u in users.values()):
        who = cli_actor(settings)
        return Actor(name=who.name, role="admin", source="cli", mode=who.mode)  # first setup
    return cli_actor(settings, as_admin=True)  # refused with the reason unless root or an admin


def _change(action: str, name: str, fn) -> int:
    from zimage.auth import checked
    from zimage.settings import get_settings

    settings = get_settings()
    actor = _admin(settings)
    with checked(settings, actor, f"user.{action}", f"user:{name}", verb="users") as note:
        fn(settings)
        note["detail"] = action
    return 0


def run_add(args) -> int:
    from zimage.auth import users_file

    password = read_password()
    _change("add", args.name, lambda s: users_file.add_user(s, args.name, password, args.role))
    print(f"added {args.name} ({args.role})")
    return 0


def run_passwd(args) -> int:
    from zimage.auth import users_file

    password = read_password()
    _change("passwd", args.name, lambda s: users_file.set_password(s, args.name, password))
    print(f"password of {args.name} changed")
    return 0


def run_remove(args) -> int:
    from zimage.auth import users_file

    _change("remove", args.name, lambda s: users_file.remove_user(s, args.name))
    print(f"removed {args.name}")
    return 0


def run_role(args) -> int:
    from zimage.auth import users_file

    _change("role", args.name, lambda s: users_file.set_role(s, args.name, args.role))
    print(f"{args.name} is now {args.role}")
    return 0


def run_list(args) -> int:
    from zimage.auth.users_file import read_users, users_path
    from zimage.settings import get_settings

    settings = get_settings()
    users = read_users(settings)
    mode = settings.home_settings().auth.mode
    print(f"auth mode: {mode}   users file: {users_path(settings)}")
    if not users:
        print("(no users)")
    for name, entry in sorted(users.items()):
        print(f"{name:<32} {entry.role}")
    return 0
