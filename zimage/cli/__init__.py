"""The `zimage` command. Each module in this package adds its subcommands through `register(sub)`,
so a new command is a new file. Heavy imports (torch, diffusers) happen inside the handlers, which
keeps `zimage --help` instant."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from zimage import __version__
from zimage.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zimage", description="Z-Image LoRA Studio, headless.")
    parser.add_argument("--version", action="version", version=f"zimage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
