"""``kvgate route`` settings: sections read by the same builder as ``kvgate serve``'s
(``config.add_flags`` / ``config.from_env``), each setting also ``KVGATE_<NAME>``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvgate.gateway import config
from kvgate.gateway.config import EventsSettings, HttpSettings, MetricsSettings, opt


@dataclass
class RoutingSettings:
    db: str = opt("sqlite:///./kvgate.db", "the replicas' ledger URL "
                                           "(postgresql+asyncpg://... when several)", api=True)
    model: str = opt("smollm2", "the replicas' --model (smollm2, as theirs by default): its "
                                "tokenizer and chat template render prompts as they do",
                     api=True)
    replicas: list[str] = opt(factory=list, help="a replica's base URL, e.g. "
                              "http://10.0.0.5:8000 (repeatable; also KVGATE_REPLICAS, "
                              "comma-separated)", api=True, flag="replica", action="append",
                              metavar="URL")
    replicas_dns: str = opt("", "HOST:PORT resolved every few seconds; each address is a "
                                "replica", api=True)
    # Every this many seconds each replica's view is compared with a fresh snapshot and
    # replaced by it (differences counted in kvgate_router_reconcile_differences); 0: never.
    reconcile_interval_s: float = opt(300.0, "seconds between comparisons of each replica's "
                                             "view with a fresh snapshot of its cache (300; "
                                             "0: never)")
    upstream_idle_timeout_s: float = opt(300.0, "a replica that sends nothing for this "
                                                "long, before its answer's headers (504) or "
                                                "within its answer (ended with an error), "
                                                "is cut (300)")


# What the router has no use for: it is no replica (no id of its own) and shares no KV.
_EXCLUDED = frozenset({"replica_id"})
_HELPS = {"port": "port to listen on (8080)",
          "write_timeout": "seconds a client may take to accept bytes of an answer; then the "
                           "answer is cut and the replica stops (30; 0: no limit)"}


@dataclass
class RouterSettings:
    http: HttpSettings = field(default_factory=lambda: HttpSettings(port=8080))
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    events: EventsSettings = field(default_factory=EventsSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 **overrides: Any) -> RouterSettings:
        env = os.environ if environ is None else environ
        s = config.from_env(cls, env, _EXCLUDED, **overrides)
        if not s.events.events_secret:  # one secret for both, as the replicas read it
            s.events.events_secret = env.get("KVGATE_SHARED_TIER_SECRET") or None
        return s


def add_flags(p: argparse.ArgumentParser) -> None:
    config.add_flags(p, RouterSettings, _EXCLUDED, _HELPS)


def from_args(args: argparse.Namespace) -> RouterSettings:
    return RouterSettings.from_env(**config.args_overrides(RouterSettings, args, _EXCLUDED))
