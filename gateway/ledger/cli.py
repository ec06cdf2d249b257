"""``kvgate migrate | tenants | keys | plans | usage``: tables for people, ``--json`` for
scripts. Every command takes ``--db`` (default: ``KVGATE_DB``, else ``./kvgate.db``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from gateway.config import Settings, parse_bytes

from . import migrate as migrations
from .db import create_engine, migrates_on_start
from .errors import LedgerError
from .ledger import Ledger

Handler = Callable[[Ledger, argparse.Namespace], Awaitable[Any]]


def register(sub: Any) -> None:
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", default=None,
                    help="ledger database URL (default: $KVGATE_DB or sqlite:///./kvgate.db)")
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON for scripts")

    p = sub.add_parser("migrate", parents=[db], help="upgrade the ledger schema")
    p.add_argument("--to", default="head", metavar="REV", help="target revision (head)")
    p.add_argument("--downgrade", metavar="REV",
                   help="roll back to REV instead (e.g. base); destroys data of later revisions")
    p.set_defaults(func=_cmd_migrate)

    tenants = sub.add_parser("tenants", help="create and list tenants")
    tsub = tenants.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = tsub.add_parser("create", parents=[db, out], help="create a tenant")
    p.add_argument("name")
    p.add_argument("--plan", default=None, help="price plan name (default: default)")
    p.add_argument("--cache-ttl-seconds", type=int)
    p.add_argument("--cache-quota-bytes", type=parse_bytes, help="e.g. 536870912 or 512MiB")
    p.add_argument("--requests-per-minute", type=int)
    p.add_argument("--tokens-per-minute", type=int)
    p.add_argument("--max-concurrent", type=int)
    p.set_defaults(func=_runner(_tenants_create))
    p = tsub.add_parser("list", parents=[db, out], help="list tenants")
    p.add_argument("--all", action="store_true", help="include deleted tenants")
    p.set_defaults(func=_runner(_tenants_list))

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = ksub.add_parser("create", parents=[db, out],
                        help="create a key (printed once; only its hash is kept)")
    p.add_argument("tenant", nargs="?", help="tenant name or id")
    p.add_argument("--admin", action="store_true", help="an admin key (no tenant)")
    p.set_defaults(func=_runner(_keys_create))
    p = ksub.add_parser("list", parents=[db, out], help="list a tenant's keys")
    p.add_argument("tenant", nargs="?", help="tenant name or id (omit: admin keys)")
    p.set_defaults(func=_runner(_keys_list))
    p = ksub.add_parser("revoke", parents=[db], help="revoke a key by id")
    p.add_argument("key_id", type=int)
    p.set_defaults(func=_runner(_keys_revoke))

    plans = sub.add_parser("plans", help="list and edit price plans")
    psub = plans.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = psub.add_parser("list", parents=[db, out], help="list plans")
    p.set_defaults(func=_runner(_plans_list))
    for action in ("create", "update"):
        p = psub.add_parser(action, parents=[db, out],
                            help=f"{action} a plan (micro-units per million tokens)")
        p.add_argument("name")
        for price in ("input", "cache-read", "cache-write-5m", "cache-write-1h", "output"):
            p.add_argument(f"--{price}", type=int, required=action == "create" and
                           price == "input")
        p.set_defaults(func=_runner(_plans_create if action == "create" else _plans_update))

    p = sub.add_parser("usage", parents=[db, out], help="usage and cost report")
    p.add_argument("--tenant", help="tenant name or id (default: all)")
    p.add_argument("--since", type=parse_time, help="ISO date/time (UTC if no zone) or 7d, 24h")
    p.add_argument("--until", type=parse_time, help="exclusive; same forms as --since")
    p.add_argument("--group-by", choices=("day", "model"), default="day")
    p.set_defaults(func=_runner(_usage))


def parse_time(text: str) -> datetime:
    """``2026-01-31``, ``2026-01-31T12:00:00+02:00`` (no zone: UTC), or ``7d``/``24h``/``30m``
    meaning that long before now."""
    m = re.fullmatch(r"(\d+)([dhm])", text.strip())
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        return datetime.now(timezone.utc) - timedelta(**{unit: int(m.group(1))})
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (use 2026-01-31, 2026-01-31T12:00:00Z or 7d)") from exc
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _db_url(args: argparse.Namespace) -> str:
    return args.db or Settings.from_env().db


def _runner(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Open the ledger (SQLite migrates itself, as ``serve`` does), run, close."""

    def run(args: argparse.Namespace) -> int:
        async def main() -> Any:
            url = _db_url(args)
            ledger = await Ledger.open(url, migrate=migrates_on_start(url))
            try:
                return await handler(ledger, args)
            finally:
                await ledger.close()

        return _guard(main)

    return run


def _guard(main: Callable[[], Awaitable[Any]]) -> int:
    try:
        asyncio.run(main())
    except LedgerError as exc:
        print(f"kvgate: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    async def main() -> None:
        engine = create_engine(_db_url(args))
        try:
            before = await migrations.current_revision(engine)
            if args.downgrade:
                await migrations.downgrade(engine, args.downgrade)
            else:
                await migrations.upgrade(engine, args.to)
            after = await migrations.current_revision(engine)
        except LedgerError:
            raise
        except Exception as exc:
            raise LedgerError(f"migration failed: {exc}") from exc
        finally:
            await engine.dispose()
        print(f"ledger schema: {before or 'empty'} -> {after or 'empty'}")

    return _guard(main)


def _emit(args: argparse.Namespace, data: Any, columns: list[str] | None = None) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
        return
    rows = data if isinstance(data, list) else [data]
    print_table(rows, columns or (list(rows[0]) if rows else []))


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    numeric = [all(row[i].lstrip("-").isdigit() for row in cells) and cells
               for i in range(len(columns))]
    for line in ([c.upper() for c in columns], *cells):
        print("  ".join(v.rjust(w) if num else v.ljust(w)
                        for v, w, num in zip(line, widths, numeric, strict=True)).rstrip())


async def _tenants_create(ledger: Ledger, args: argparse.Namespace) -> None:
    tenant = await ledger.create_tenant(
        args.name, plan=args.plan, cache_ttl_seconds=args.cache_ttl_seconds,
        cache_quota_bytes=args.cache_quota_bytes, requests_per_minute=args.requests_per_minute,
        tokens_per_minute=args.tokens_per_minute, max_concurrent=args.max_concurrent)
    _emit(args, tenant)


_TENANT_COLUMNS = ["id", "name", "status", "plan", "cache_ttl_seconds", "cache_quota_bytes",
                   "requests_per_minute", "tokens_per_minute", "max_concurrent", "created_at"]


async def _tenants_list(ledger: Ledger, args: argparse.Namespace) -> None:
    _emit(args, await ledger.list_tenants(include_deleted=args.all), _TENANT_COLUMNS)


async def _keys_create(ledger: Ledger, args: argparse.Namespace) -> None:
    if args.admin == bool(args.tenant):
        raise LedgerError("name a tenant, or pass --admin for an admin key (not both)")
    tenant_id = None if args.admin else (await ledger.find_tenant(args.tenant))["id"]
    key = await ledger.create_key(tenant_id, role="admin" if args.admin else "tenant")
    if args.json:
        _emit(args, key)
    else:
        print(f"key id {key['id']} ({key['role']}) — store it now, it is not shown again:")
        print(key["key"])


async def _keys_list(ledger: Ledger, args: argparse.Namespace) -> None:
    tenant_id = (await ledger.find_tenant(args.tenant))["id"] if args.tenant else None
    keys = await ledger.list_keys(tenant_id)
    _emit(args, keys, ["id", "prefix", "role", "tenant_id", "created_at", "revoked_at"])


async def _keys_revoke(ledger: Ledger, args: argparse.Namespace) -> None:
    await ledger.revoke_key(args.key_id)
    print(f"key {args.key_id} revoked")


_PLAN_COLUMNS = ["id", "name", "input", "cache_read", "cache_write_5m", "cache_write_1h",
                 "output"]


def _prices(args: argparse.Namespace) -> dict[str, int]:
    names = ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


async def _plans_list(ledger: Ledger, args: argparse.Namespace) -> None:
    _emit(args, await ledger.list_plans(), _PLAN_COLUMNS)


async def _plans_create(ledger: Ledger, args: argparse.Namespace) -> None:
    _emit(args, await ledger.create_plan(args.name, **_prices(args)), _PLAN_COLUMNS)


async def _plans_update(ledger: Ledger, args: argparse.Namespace) -> None:
    _emit(args, await ledger.update_plan(args.name, **_prices(args)), _PLAN_COLUMNS)


async def _usage(ledger: Ledger, args: argparse.Namespace) -> None:
    tenant_id = (await ledger.find_tenant(args.tenant))["id"] if args.tenant else None
    report = await ledger.usage_report(tenant_id, args.since, args.until, args.group_by)
    if args.json:
        _emit(args, report)
        return
    columns = [args.group_by, "requests", "prompt_tokens", "cached_tokens",
               "cache_write_tokens", "completion_tokens", "cost_micros"]
    print_table([*report["rows"], {args.group_by: "TOTAL", **report["totals"]}], columns)


def main(argv: list[str] | None = None) -> int:
    """Only the ledger's commands (``python -m gateway.ledger.cli``): they start without
    importing the model stack, which suits migration jobs and scripts."""
    parser = argparse.ArgumentParser(prog="kvgate", description="kvgate ledger commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
