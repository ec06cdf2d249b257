"""The ``kvgate`` command: serve, migrate, tenants, keys, usage.

Each layer registers its own subcommands (``register(subparsers)``) so this file stays a
table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, attribute) pairs; each module exposes register(subparsers).
_COMMAND_MODULES = ("gateway.http.serve", "gateway.ledger.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvgate", description="Multi-tenant prompt-caching gateway for LLM serving."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and mod_name.startswith(exc.name):
                continue  # that layer is not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
