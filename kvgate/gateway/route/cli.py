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

from kvgate.gateway import loop
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
    try:
        settings = from_args(args)
    except ValueError as exc:  # a KVGATE_* value that is no value of its setting
        print(f"kvgate route: {exc}", file=sys.stderr, flush=True)
        return 2
    logging.basicConfig(level=settings.http.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.http.admin_key:
        print("kvgate route: set KVGATE_ADMIN_KEY (the replicas' admin key): the router "
              "reads their load and cache snapshots with it", file=sys.stderr, flush=True)
        return 2
    bad = [u for u in settings.routing.replicas if not u.startswith(("http://", "https://"))]
    if bad:
        print(f"kvgate route: --replica {bad[0]}: give the replica's base URL, e.g. "
              f"http://{bad[0]}", file=sys.stderr, flush=True)
        return 2
    if not settings.routing.replicas and not settings.routing.replicas_dns:
        print("kvgate route: name the replicas (--replica URL, KVGATE_REPLICAS or "
              "--replicas-dns HOST:PORT)", file=sys.stderr, flush=True)
        return 2
    from kvgate.gateway.ledger.cli import require_existing_sqlite
    from kvgate.gateway.ledger.errors import LedgerError
    from kvgate.gateway.protocol.wire import EventsMisconfigured, key_for

    try:  # before the tokenizer loads: a missing secret is said at once
        key_for(settings.events.events_url, settings.events.events_secret, None, settings.events.events_unsigned,
                "kvgate route")
    except EventsMisconfigured as e:
        print(f"kvgate route: {e}", file=sys.stderr, flush=True)
        return 2

    try:  # the router checks keys in the replicas' ledger: never create an empty one
        require_existing_sqlite(settings.routing.db, "--db, KVGATE_DB or the default")
    except LedgerError as e:
        print(f"kvgate route: {e} The router reads the replicas' ledger (KVGATE_DB).",
              file=sys.stderr, flush=True)
        return 2
    from kvgate.gateway.edge.transport import cannot_listen
    from kvgate.gateway.route.prompt import tokenizer_for

    problem = cannot_listen(settings.http.host, settings.http.port)
    if problem:
        print(f"kvgate route: cannot listen on {settings.http.host}:{settings.http.port} "
              f"(--port): {problem}", file=sys.stderr, flush=True)
        return 2
    try:  # loaded once (cached): a model that is not there is said now, in one line
        tokenizer_for(settings.routing.model)
    except Exception as exc:  # the tokenizer libraries raise plain Exceptions
        print(f"kvgate route: --model {settings.routing.model}: cannot load its tokenizer: "
              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr, flush=True)
        return 2
    return loop.run(route(settings), settings.http.event_loop)


def _events_mode(settings: RouterSettings) -> str:
    if not settings.events.events_url:
        return "off"
    return "signed" if settings.events.events_secret else "UNSIGNED"


async def route(settings: RouterSettings) -> int:
    from kvgate.gateway.edge.transport import GatewayRunner
    from kvgate.gateway.ledger.errors import LedgerError
    from kvgate.gateway.route.app import create_router_app

    app = create_router_app(settings)
    runner = GatewayRunner(app, handle_signals=False, access_log=None,
                           shutdown_timeout=settings.http.shutdown_timeout_s)
    try:
        await runner.setup()
    except LedgerError as exc:  # a schema older than this release's (``kvgate migrate``)
        print(f"kvgate route: {exc}", file=sys.stderr, flush=True)
        await runner.cleanup()
        return 2
    try:
        await web.TCPSite(runner, settings.http.host, settings.http.port).start()
        port = runner.addresses[0][1] if runner.addresses else settings.http.port
        print(f"kvgate: routing on http://{settings.http.host}:{port} to "
              f"{settings.routing.replicas_dns or ', '.join(settings.routing.replicas)}"
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
