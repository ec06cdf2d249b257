"""``kvgate route``: run the routing tier until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from typing import Any

from aiohttp import web

from kvgate.gateway.route.settings import RouterSettings, add_flags, from_args


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "route", help="route requests to several serve replicas by cached prefix",
        description="The routing tier: same client API as serve, sends each request to the "
        "replica holding the tenant's longest cached prefix, weighed against load. Every "
        "flag is also KVGATE_<NAME>; the admin key (needed to poll the replicas) only from "
        "KVGATE_ADMIN_KEY, the cache events secret only from KVGATE_EVENTS_SECRET (or "
        "KVGATE_SHARED_TIER_SECRET).")
    add_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = from_args(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.admin_key:
        print("kvgate route: set KVGATE_ADMIN_KEY (the replicas' admin key): the router "
              "reads their load and cache snapshots with it", file=sys.stderr, flush=True)
        return 2
    if not settings.replicas and not settings.replicas_dns:
        print("kvgate route: name the replicas (--replica URL, KVGATE_REPLICAS or "
              "--replicas-dns HOST:PORT)", file=sys.stderr, flush=True)
        return 2
    from kvgate.gateway.ledger.cli import require_existing_sqlite
    from kvgate.gateway.ledger.errors import LedgerError
    from kvgate.gateway.route.events import EventsMisconfigured, key_for

    try:  # before the tokenizer loads: a missing secret is said at once
        key_for(settings.events_url, settings.events_secret, None, settings.events_unsigned,
                "kvgate route")
    except EventsMisconfigured as e:
        print(f"kvgate route: {e}", file=sys.stderr, flush=True)
        return 2

    try:  # the router checks keys in the replicas' ledger: never create an empty one
        require_existing_sqlite(settings.db, "--db, KVGATE_DB or the default")
    except LedgerError as e:
        print(f"kvgate route: {e} The router reads the replicas' ledger (KVGATE_DB).",
              file=sys.stderr, flush=True)
        return 2
    return asyncio.run(route(settings))


def _events_mode(settings: RouterSettings) -> str:
    if not settings.events_url:
        return "off"
    return "signed" if settings.events_secret else "UNSIGNED"


async def route(settings: RouterSettings) -> int:
    from kvgate.gateway.http.transport import GatewayRunner
    from kvgate.gateway.route.app import create_router_app

    app = create_router_app(settings)
    runner = GatewayRunner(app, handle_signals=False, access_log=None, shutdown_timeout=30)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        port = runner.addresses[0][1] if runner.addresses else settings.port
        print(f"kvgate: routing on http://{settings.host}:{port} to "
              f"{settings.replicas_dns or ', '.join(settings.replicas)}"
              f" (cache events: {_events_mode(settings)})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
    gc.freeze()  # the process exits next: its final collections need not walk what it built
    return 0
