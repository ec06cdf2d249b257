"""``kvgate serve``: run the gateway until SIGTERM/SIGINT, then drain in-flight requests."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from kvgate.gateway import loop
from kvgate.gateway.config import Settings, add_flags, args_overrides

MIN_ADMIN_KEY_LEN = 20  # a key an operator chose: long enough not to be guessed


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP gateway",
                              description="Serve the OpenAI/Anthropic-compatible API. Every "
                              "flag is also read from KVGATE_<NAME> (flag wins); the admin "
                              "key only from KVGATE_ADMIN_KEY.")
    add_flags(p, Settings)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings.from_env(**args_overrides(Settings, args))


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:  # a KVGATE_* value that is no value of its setting
        print(f"kvgate: {exc}", file=sys.stderr, flush=True)
        return 2
    logging.basicConfig(level=settings.http.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gc.disable()  # while starting: millions of objects (torch, transformers, the model), all kept
    try:
        return loop.run(serve(settings), settings.http.event_loop)
    finally:
        gc.enable()


async def serve(settings: Settings) -> int:
    from kvgate.gateway.edge.transport import GatewayRunner, cannot_listen
    from kvgate.gateway.engine.client import CoreFailedToStart
    from kvgate.gateway.engine.demo import SHAPES
    from kvgate.gateway.engine.gguf import GGUFError, is_gguf
    from kvgate.gateway.engine.gguf import resolve as resolve_gguf
    from kvgate.gateway.engine.loader import ModelFilesMissing, check_model_dir
    from kvgate.gateway.engine.request import EngineMisconfigured
    from kvgate.gateway.http.app import create_app, engine_config
    from kvgate.gateway.http.openai.models import served_names
    from kvgate.gateway.http.state import STATE
    from kvgate.gateway.ledger.receipts import ReceiptKeyError
    from kvgate.gateway.protocol.tool_parsers import parser_for
    from kvgate.gateway.protocol.wire import EventsMisconfigured

    try:
        parser_for(None, settings.engine.tool_call_parser)
    except ValueError as exc:  # a typo: say so now, not after loading the model
        print(f"kvgate: --tool-call-parser: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        engine_config(settings)  # a bad --kv-dtype, --dtype, --device...: say so now
    except (ValueError, EngineMisconfigured) as exc:
        print(f"kvgate: {exc}", file=sys.stderr, flush=True)
        return 2
    if (settings.http.api_servers or 0) > 1:
        print(f"kvgate: --api-servers {settings.http.api_servers}: at most 1 API server process "
              "for now (0: the engine in this process). Tenant rate limits, /metrics and the "
              "storage billing timers live in the API server; several would each enforce the "
              "full limits and bill reservations once each", file=sys.stderr, flush=True)
        return 2
    if settings.http.admin_key and len(settings.http.admin_key) < MIN_ADMIN_KEY_LEN:
        print(f"kvgate: KVGATE_ADMIN_KEY is {len(settings.http.admin_key)} characters; an admin key "
              f"needs at least {MIN_ADMIN_KEY_LEN} (e.g. `openssl rand -hex 24`), or leave it "
              "unset and serve creates one", file=sys.stderr, flush=True)
        return 2
    try:  # a typo, an unreadable or unsupported file, a missing wheel: say so before the
        # ledger is created (its first start makes an admin key it prints only once)
        if is_gguf(settings.engine.model):  # checked and converted now: a file transformers
            # cannot read is refused here too
            resolve_gguf(settings.engine.model, engine_config(settings).torch_dtype)
        elif settings.engine.model not in SHAPES:
            check_model_dir(Path(settings.engine.model).expanduser())
    except (GGUFError, ModelFilesMissing) as exc:
        print(f"kvgate: {exc}", file=sys.stderr, flush=True)
        return 2
    for what, port in (("--port", settings.http.port), ("--metrics-port", settings.metrics.metrics_port)):
        problem = cannot_listen(settings.http.host, port)
        if problem:  # say so now, not after loading the model
            print(f"kvgate: cannot listen on {settings.http.host}:{port} ({what}): {problem}",
                  file=sys.stderr, flush=True)
            return 2
    try:
        app = create_app(settings)
    except ReceiptKeyError as exc:
        print(f"kvgate: --receipt-key-file: {exc}", file=sys.stderr, flush=True)
        return 2
    except EventsMisconfigured as exc:
        print(f"kvgate: {exc}", file=sys.stderr, flush=True)
        return 2
    runner = GatewayRunner(app, shutdown_timeout=settings.http.shutdown_timeout_s,
                           handle_signals=False, access_log=None)
    try:
        await runner.setup()
    except (ModelFilesMissing, GGUFError, EngineMisconfigured, CoreFailedToStart) as exc:
        print(f"kvgate: {exc}", file=sys.stderr, flush=True)
        await runner.cleanup()
        return 2
    gc.freeze()  # what starting built lives as long as the process: no collection walks it
    gc.enable()
    try:
        site = web.TCPSite(runner, settings.http.host, settings.http.port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else settings.http.port
        print(banner(settings, port, app[STATE].admin_key_created,
                     served_names(app[STATE])[0], app[STATE].engine), flush=True)
        metrics_port = app[STATE].metrics.listen_port
        if metrics_port is not None:
            print(f"kvgate: /metrics on http://{_host_for_url(settings.http.host)}:{metrics_port}"
                  "/metrics only" + ("" if settings.metrics.metrics_key else
                                     " (no KVGATE_METRICS_KEY: open to whoever reaches it)"),
                  flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("kvgate: shutting down, draining in-flight requests "
              f"(up to {settings.http.shutdown_timeout_s:g}s)", flush=True)
    finally:
        await runner.cleanup()  # stop accepting, wait for handlers, close engine and ledger
    gc.freeze()  # the process exits next: its final collections need not walk what it built
    return 0


def banner(settings: Settings, port: int, admin_key: str | None, model_id: str,
           engine: object = None) -> str:
    url = f"http://{_host_for_url(settings.http.host)}:{port}"
    lines = [f"kvgate: serving model '{model_id}' on {url} (ledger: {_safe_db(settings.ledger.db)})"]
    core = getattr(engine, "info", {}).get("pid")
    if core is not None:  # --api-servers 1: the engine in a child process
        lines.append(f"kvgate: the engine core runs in its own process, {core} "
                     "(--api-servers 0 would run it in this one)")
    if admin_key:
        lines.append(f"kvgate: created an admin key; it is shown only now:\n\n    {admin_key}\n")
        admin = f"ADMIN={admin_key}"
    elif settings.http.admin_key:
        admin = 'ADMIN="$KVGATE_ADMIN_KEY"'
    else:
        admin = "ADMIN=<the admin key printed on first start>"
    auth = '-H "Authorization: Bearer $ADMIN"'
    lines += [
        "Try it (create a tenant, give it a key, send a request):",
        "",
        f"  {admin}",
        f"  TENANT=$(curl -s -X POST {url}/admin/tenants {auth} \\",
        "      -H 'Content-Type: application/json' -d \"{\\\"name\\\": \\\"demo-$RANDOM\\\"}\" \\",
        "      | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"id\"])')",
        f"  KEY=$(curl -s -X POST {url}/admin/tenants/$TENANT/keys {auth} \\",
        "      | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"key\"])')",
        f"  curl -s {url}/v1/chat/completions -H \"Authorization: Bearer $KEY\" \\",
        "      -H 'Content-Type: application/json' \\",
        f"      -d '{{\"model\": \"{model_id}\", \"max_tokens\": 16, "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'",
        "",
    ]
    return "\n".join(lines)


def _host_for_url(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _safe_db(url: str) -> str:
    """Hide a password in the printed URL."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
