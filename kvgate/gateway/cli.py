"""The ``kvgate`` command: serve, route, migrate, tenants, keys, usage, receipts, plan.

Each layer registers its own subcommands (``register(subparsers)``) so this file stays a
table of contents.
"""

from __future__ import annotations

import argparse
import sys

from kvgate.gateway.http import serve
from kvgate.gateway.ledger import cli as ledger_cli
from kvgate.gateway.ledger import receipts_cli
from kvgate.gateway.plan import cli as plan_cli
from kvgate.gateway.route import cli as route_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvgate", description="Multi-tenant prompt-caching gateway for LLM serving."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    serve.register(sub)
    ledger_cli.register(sub)
    receipts_cli.register(sub)
    route_cli.register(sub)
    plan_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
