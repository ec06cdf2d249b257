"""``kvgate migrate | tenants | keys | plans | usage``: tables for people, ``--json`` for
scripts. Every command takes ``--db`` (default: ``KVGATE_DB``, else ``./kvgate.db``).

Only ``migrate`` (and ``serve``) create a SQLite ledger; the other commands refuse a file
that is not there, since the default path is relative to the current directory and a new
empty ledger there would answer every question with zeros."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any

from sqlalchemy.engine import make_url

from kvgate.gateway.config import ENV_PREFIX, Settings, parse_bytes

from . import migrate as migrations
from .budgets import MAX_BUDGET, PERIODS
from .db import async_url, create_engine, migrates_on_start
from .errors import InvalidInput, LedgerError
from .ledger import DEFAULT_CURRENCY, Ledger
from .reports import FIELDS, GROUPS
from .timespec import FORMS, parse_time

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
    p.add_argument("--cache-reserved-device-bytes", type=parse_bytes,
                   help="reserved cache on each replica's device tier, e.g. 256MiB, billed "
                   "per GiB-hour (default: none)")
    p.add_argument("--cache-reserved-host-bytes", type=parse_bytes,
                   help="reserved cache on each replica's host tier (default: none)")
    p.add_argument("--cache-share-bytes", type=parse_bytes,
                   help="the former name: a reservation of this many bytes on both tiers")
    p.add_argument("--cache-max-ttl-seconds", type=int,
                   help="longest cache TTL its requests may ask for (default 86400)")
    p.add_argument("--requests-per-minute", type=int)
    p.add_argument("--tokens-per-minute", type=int)
    p.add_argument("--max-concurrent", type=int)
    _budget_args(p)
    p.add_argument("--min-priority", type=int,
                   help="lowest request priority its requests may ask for, -1000 to 1000 "
                   "(lower runs first; default 0: none ahead of the default class)")
    p.add_argument("--max-running-sequences", type=int,
                   help="how many of its sequences may run at once (default: no cap)")
    p.set_defaults(func=_runner(_tenants_create))
    p = tsub.add_parser("update", parents=[db, out],
                        help="change a tenant's spend budgets (the admin API changes the rest)")
    p.add_argument("tenant", help="tenant name or id")
    _budget_args(p, clear=True)
    p.set_defaults(func=_runner(_tenants_update))
    p = tsub.add_parser("list", parents=[db, out], help="list tenants")
    p.add_argument("--all", action="store_true", help="include deleted tenants")
    p.set_defaults(func=_runner(_tenants_list))

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = ksub.add_parser("create", parents=[db, out],
                        help="create a key (printed once; only its hash is kept)")
    p.add_argument("tenant", nargs="?", help="tenant name or id")
    p.add_argument("--admin", action="store_true", help="an admin key (no tenant)")
    _budget_args(p)
    p.set_defaults(func=_runner(_keys_create))
    p = ksub.add_parser("update", parents=[db, out],
                        help="change a key's own spend budgets (besides its tenant's)")
    p.add_argument("key_id", type=int)
    _budget_args(p, clear=True)
    p.set_defaults(func=_runner(_keys_update))
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
                            help=f"{action} a plan (micro-units per million tokens; "
                            "--cache-reservation per GiB-hour, --cache-storage per "
                            "million token-hours)")
        p.add_argument("name")
        for price in ("input", "cache-read", "cache-write-5m", "cache-write-1h", "output",
                      "cache-write-24h", "cache-reservation", "cache-storage"):
            p.add_argument(f"--{price}", type=int, required=action == "create" and
                           price == "input")
        p.add_argument("--scheduling-weight", type=int,
                       help="its tenants' share of the engine under contention, relative "
                       "to weight 1 (1 to 1000; default 1)")
        if action == "create":
            p.add_argument("--currency", default=DEFAULT_CURRENCY,
                           help="ISO 4217 code of the prices, fixed once created (USD)")
        p.set_defaults(func=_runner(_plans_create if action == "create" else _plans_update))

    p = sub.add_parser("usage", parents=[db, out], help="usage and cost report")
    p.add_argument("--tenant", help="tenant name or id (default: all)")
    p.add_argument("--since", type=_time_arg, help=f"inclusive: {FORMS}")
    p.add_argument("--until", type=_time_arg, help="exclusive; same forms as --since")
    p.add_argument("--group-by", choices=GROUPS, default="day",
                   help="one row per tenant, key, model or day (day)")
    p.set_defaults(func=_runner(_usage))


_CLEAR = -1  # ``--budget-daily none``: clear the budget


def _budget_args(p: argparse.ArgumentParser, clear: bool = False) -> None:
    hint = "; 'none' clears it" if clear else " (default: none)"
    for period, span in (("daily", "day"), ("monthly", "month")):
        p.add_argument(f"--budget-{period}", type=_budget_arg, metavar="MICROS",
                       help=f"spend budget per UTC {span} in micro-units of the plan's "
                       f"currency{hint}")


def _budget_arg(text: str) -> int:
    if text.strip().lower() == "none":
        return _CLEAR
    if not (text.isascii() and text.strip().isdigit()) or int(text) > MAX_BUDGET:
        raise argparse.ArgumentTypeError(
            f"a whole number of micro-units from 0 to {MAX_BUDGET}, or none; got {text!r}")
    return int(text)


def _budgets(args: argparse.Namespace) -> dict[str, Any]:
    """The budget flags given (a cleared one as None)."""
    return {f"budget_{p}_micros": None if v == _CLEAR else v
            for p in ("daily", "monthly") if (v := getattr(args, f"budget_{p}")) is not None}


def _time_arg(text: str) -> datetime:
    try:
        return parse_time(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _db_url(args: argparse.Namespace) -> str:
    return args.db or Settings.from_env().ledger.db


def _db_source(args: argparse.Namespace) -> str:
    if args.db:
        return "--db"
    if os.environ.get(f"{ENV_PREFIX}DB"):
        return f"${ENV_PREFIX}DB"
    return "the default"


def require_existing_sqlite(url: str, source: str) -> None:
    """Refuse a SQLite URL whose file is not there, naming the absolute path looked at.

    Opening it would create an empty ledger, and a report from that is all zeros: the
    usual cause is running from another directory than the one of ``./kvgate.db``.
    """
    parsed = make_url(async_url(url))
    if parsed.get_backend_name() != "sqlite":
        return
    path = parsed.database or ""
    if path.startswith("file:"):  # a SQLite URI filename (uri=true)
        if "mode=memory" in path:
            return
        path = path[len("file:"):].partition("?")[0]
    if path in ("", ":memory:") or os.path.exists(path):
        return
    relative = "" if os.path.isabs(path) else "; a relative path starts at the current directory"
    raise LedgerError(
        f"no ledger database at {os.path.abspath(path)} ({url}, from {source}{relative}). "
        "Run kvgate from the directory that holds the ledger, pass --db "
        f"sqlite:////absolute/path/kvgate.db, or set {ENV_PREFIX}DB; `kvgate serve` and "
        "`kvgate migrate` create a new ledger.")


def _runner(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Open the ledger (SQLite migrates itself, as ``serve`` does), run, close."""

    def run(args: argparse.Namespace) -> int:
        async def main() -> Any:
            url = _db_url(args)
            require_existing_sqlite(url, _db_source(args))
            ledger = await Ledger.open(url, migrate=migrates_on_start(url))
            try:
                return await handler(ledger, args)
            finally:
                await ledger.close()

        return _guard(main)

    return run


def _guard(main: Callable[[], Coroutine[Any, Any, Any]]) -> int:
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
        cache_quota_bytes=args.cache_quota_bytes,
        cache_reserved_device_bytes=_first(args.cache_reserved_device_bytes,
                                           args.cache_share_bytes),
        cache_reserved_host_bytes=_first(args.cache_reserved_host_bytes, args.cache_share_bytes),
        cache_max_ttl_seconds=args.cache_max_ttl_seconds,
        requests_per_minute=args.requests_per_minute,
        tokens_per_minute=args.tokens_per_minute, max_concurrent=args.max_concurrent,
        min_priority=args.min_priority, max_running_sequences=args.max_running_sequences,
        **_budgets(args))
    _emit(args, tenant)


async def _tenants_update(ledger: Ledger, args: argparse.Namespace) -> None:
    fields = _budgets(args)
    if not fields:
        raise LedgerError("nothing to change: pass --budget-daily and/or --budget-monthly")
    tenant = await ledger.find_tenant(args.tenant)
    _emit(args, await ledger.update_tenant(tenant["id"], **fields), _TENANT_COLUMNS)


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


_TENANT_COLUMNS = ["id", "name", "status", "plan", "cache_ttl_seconds", "cache_quota_bytes",
                   "cache_reserved_device_bytes", "cache_reserved_host_bytes",
                   "cache_max_ttl_seconds", "requests_per_minute", "tokens_per_minute",
                   "max_concurrent", "budget_daily_micros", "budget_monthly_micros",
                   "min_priority", "max_running_sequences", "created_at"]


async def _tenants_list(ledger: Ledger, args: argparse.Namespace) -> None:
    _emit(args, await ledger.list_tenants(include_deleted=args.all), _TENANT_COLUMNS)


async def _keys_create(ledger: Ledger, args: argparse.Namespace) -> None:
    if args.admin == bool(args.tenant):
        raise LedgerError("name a tenant, or pass --admin for an admin key (not both)")
    tenant_id = None if args.admin else (await ledger.find_tenant(args.tenant))["id"]
    key = await ledger.create_key(tenant_id, role="admin" if args.admin else "tenant",
                                  **_budgets(args))
    if args.json:
        _emit(args, key)
    else:
        print(f"key id {key['id']} ({key['role']}) — store it now, it is not shown again:")
        print(key["key"])


async def _keys_list(ledger: Ledger, args: argparse.Namespace) -> None:
    tenant_id = (await ledger.find_tenant(args.tenant))["id"] if args.tenant else None
    keys = await ledger.list_keys(tenant_id)
    _emit(args, keys, _KEY_COLUMNS)


_KEY_COLUMNS = ["id", "prefix", "role", "tenant_id", "budget_daily_micros",
                "budget_monthly_micros", "created_at", "revoked_at"]


async def _keys_update(ledger: Ledger, args: argparse.Namespace) -> None:
    fields = _budgets(args)
    if not fields:
        raise LedgerError("nothing to change: pass --budget-daily and/or --budget-monthly")
    _emit(args, await ledger.update_key(args.key_id, **fields), _KEY_COLUMNS)


async def _keys_revoke(ledger: Ledger, args: argparse.Namespace) -> None:
    await ledger.revoke_key(args.key_id)
    print(f"key {args.key_id} revoked")


_PLAN_COLUMNS = ["id", "name", "currency", "input", "cache_read", "cache_write_5m",
                 "cache_write_1h", "cache_write_24h", "output", "cache_reservation",
                 "cache_storage", "scheduling_weight"]


def _prices(args: argparse.Namespace) -> dict[str, int]:
    names = ("input", "cache_read", "cache_write_5m", "cache_write_1h", "output",
             "cache_write_24h", "cache_reservation", "cache_storage")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


async def _plans_list(ledger: Ledger, args: argparse.Namespace) -> None:
    _emit(args, await ledger.list_plans(), _PLAN_COLUMNS)


async def _plans_create(ledger: Ledger, args: argparse.Namespace) -> None:
    _emit(args, await ledger.create_plan(args.name, currency=args.currency,
                                         scheduling_weight=args.scheduling_weight,
                                         **_prices(args)), _PLAN_COLUMNS)


async def _plans_update(ledger: Ledger, args: argparse.Namespace) -> None:
    _emit(args, await ledger.update_plan(args.name, scheduling_weight=args.scheduling_weight,
                                         **_prices(args)), _PLAN_COLUMNS)


_GROUP_COLUMNS = {"tenant": ["tenant_id", "tenant_name"],
                  "key": ["key_id", "key_prefix", "tenant_id"],
                  "model": ["model"], "day": ["day"]}


async def _usage(ledger: Ledger, args: argparse.Namespace) -> None:
    tenant_id = (await ledger.find_tenant(args.tenant))["id"] if args.tenant else None
    report = await ledger.usage_report(tenant_id, args.since, args.until, args.group_by)
    budget = await ledger.budget_status(tenant_id) if tenant_id is not None else None
    if args.json:
        _emit(args, report if budget is None else {**report, "budget": budget})
        return
    names = _GROUP_COLUMNS[args.group_by]
    print_table([*report["rows"], *_total_rows(report, names[0])],
                [*names, *FIELDS, "currency"])
    budgeted = budget is not None and any(
        b[p]["budget_micros"] is not None for b in (budget, *budget["keys"]) for p in PERIODS)
    if budget is not None and budgeted:  # (the table above stays the whole output otherwise)
        print(f"\nBudgets and spend (micro-{budget['currency']}; this UTC day and month):")
        rows = [{"budget": f"tenant {p}", "limit": budget[p]["budget_micros"],
                 "spent": budget[p]["spent_micros"], "remaining": budget[p]["remaining_micros"],
                 "resets_at": budget[p]["resets_at"]} for p in PERIODS]
        rows += [{"budget": f"key {k['id']} {p}", "limit": k[p]["budget_micros"],
                  "spent": k[p]["spent_micros"], "remaining": k[p]["remaining_micros"],
                  "resets_at": budget[p]["resets_at"]}
                 for k in budget["keys"] for p in PERIODS if k[p]["budget_micros"] is not None]
        print_table(rows, ["budget", "limit", "spent", "remaining", "resets_at"])


def _total_rows(report: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """One TOTAL line, or one per currency when the rows are in several (a sum across
    currencies would mean nothing)."""
    totals = report["totals"]
    if len(totals["cost_micros_by_currency"]) <= 1:
        return [{**totals, label: "TOTAL"}]
    lines = []
    for currency in totals["cost_micros_by_currency"]:
        rows = [r for r in report["rows"] if r["currency"] == currency]
        lines.append({label: "TOTAL", "currency": currency,
                      **{f: sum(r[f] for r in rows) for f in FIELDS}})
    return lines


def main(argv: list[str] | None = None) -> int:
    """Only the ledger's commands (``python -m kvgate.gateway.ledger.cli``): they start without
    importing the model stack, which suits migration jobs and scripts."""
    parser = argparse.ArgumentParser(prog="kvgate", description="kvgate ledger commands")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
