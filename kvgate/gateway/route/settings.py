"""``kvgate route`` settings: flags, each also ``KVGATE_<NAME>`` (flag wins)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass
class RouterSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    db: str = "sqlite:///./kvgate.db"  # the replicas' (shared) ledger: keys are checked there
    model: str = "demo"  # the replicas' --model: the router renders and tokenizes as they do
    replicas: list[str] = field(default_factory=list)  # base URLs of `kvgate serve` replicas
    replicas_dns: str = ""  # HOST:PORT whose A records are the replicas (headless Service)
    events_url: str = ""  # redis://HOST:PORT[/DB] the replicas publish cache events to
    # The key the replicas sign cache events with (env only: KVGATE_EVENTS_SECRET, else
    # KVGATE_SHARED_TIER_SECRET); unsigned, mis-signed batches are refused. With neither,
    # --events-url refuses to start unless events_unsigned is set.
    events_secret: str | None = field(default=None, repr=False)
    events_unsigned: bool = False
    # Every this many seconds each replica's view is compared with a fresh snapshot and
    # replaced by it (differences counted in kvgate_router_reconcile_differences); 0: never.
    reconcile_interval_s: float = 300.0
    admin_key: str | None = field(default=None, repr=False)  # env only: polls the replicas
    log_level: str = "info"
    max_body_bytes: int = 4 * 1024 * 1024
    read_timeout_s: int = 30
    upstream_idle_timeout_s: float = 300.0  # a replica's answer silent this long is cut
    write_timeout: float = 30.0  # a client that accepts no bytes this long is cut

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> RouterSettings:
        env = os.environ if environ is None else environ
        s = cls()
        values: dict[str, Any] = {}
        for name, kind in (("host", str), ("port", int), ("db", str), ("model", str),
                           ("replicas_dns", str), ("events_url", str), ("admin_key", str),
                           ("events_secret", str), ("events_unsigned", _bool),
                           ("reconcile_interval_s", float),
                           ("log_level", str), ("max_body_bytes", int),
                           ("read_timeout_s", int), ("upstream_idle_timeout_s", float),
                           ("write_timeout", float)):
            raw = env.get("KVGATE_" + name.upper(), "")
            if raw:
                values[name] = kind(raw)
        if "events_secret" not in values and env.get("KVGATE_SHARED_TIER_SECRET"):
            values["events_secret"] = env["KVGATE_SHARED_TIER_SECRET"]  # one secret for both
        raw = env.get("KVGATE_REPLICAS", "")
        if raw:
            values["replicas"] = [u.strip() for u in raw.split(",") if u.strip()]
        values.update({k: v for k, v in overrides.items() if v is not None and v != []})
        return replace(s, **values)


def _bool(raw: str) -> bool:
    return raw.strip().lower() in ("1", "true", "yes", "on")


_FLAGS: dict[str, tuple[Any, str]] = {
    "host": (str, "address to listen on (127.0.0.1)"),
    "port": (int, "port to listen on (8080)"),
    "db": (str, "the replicas' ledger URL (postgresql+asyncpg://... when several)"),
    "model": (str, "the replicas' --model (its tokenizer and chat template are loaded)"),
    "replicas_dns": (str, "HOST:PORT resolved every few seconds; each address is a replica"),
    "events_url": (str, "redis://HOST:PORT[/DB] the replicas publish cache events to "
                   "(signed with KVGATE_EVENTS_SECRET, else KVGATE_SHARED_TIER_SECRET)"),
    "events_unsigned": (_bool, "0|1: with --events-url and no secret, accept unsigned cache "
                        "events instead of refusing to start (0)"),
    "reconcile_interval_s": (float, "seconds between comparisons of each replica's view "
                             "with a fresh snapshot of its cache (300; 0: never)"),
    "log_level": (str, "debug | info | warning | error"),
    "upstream_idle_timeout_s": (float, "a replica's started answer that sends nothing for "
                                "this long is ended with an error (300)"),
    "write_timeout": (float, "seconds a client may take to accept bytes of an answer; then "
                      "the answer is cut and the replica stops (30; 0: no limit)"),
}


def add_flags(p: argparse.ArgumentParser) -> None:
    for name, (kind, help_text) in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None,
                       help=help_text)
    p.add_argument("--replica", dest="replicas", action="append", default=[], metavar="URL",
                   help="a replica's base URL, e.g. http://10.0.0.5:8000 (repeatable; also "
                        "KVGATE_REPLICAS, comma-separated)")


def from_args(args: argparse.Namespace) -> RouterSettings:
    return RouterSettings.from_env(**{k: getattr(args, k, None)
                                      for k in (*_FLAGS, "replicas")})
