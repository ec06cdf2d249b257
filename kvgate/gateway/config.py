"""Server settings: every `kvgate serve` flag, also readable as ``KVGATE_<NAME>``.

Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

ENV_PREFIX = "KVGATE_"


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "smollm2"
    db: str = "sqlite:///./kvgate.db"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device_cache_bytes: int = 256 * 1024 * 1024
    host_cache_bytes: int = 512 * 1024 * 1024
    block_size: int = 16
    kv_dtype: str = "auto"  # auto (the model's dtype) | fp8 | int8: the KV pages' values
    offload_kv_dtype: str = "auto"  # auto (as the device's pages) | fp8 | int8: host tier
    admin_key: str | None = field(default=None, repr=False)
    # Beyond docs/api.md: operational knobs with defaults a user rarely touches.
    max_body_bytes: int = 4 * 1024 * 1024
    max_queue: int = 256  # requests waiting for the engine before 503
    max_batch_tokens: int = 2048  # token budget of one engine step
    max_running: int = 64  # sequences decoding at once
    # One prefill per prefix: steps a request may wait for the same tenant's identical
    # prompt blocks another request is computing (then it computes them); 0 = never wait.
    single_flight_wait_steps: int = 256
    # Tenant-fair scheduling: the engine serves the tenant that has had the least service
    # (weighted tokens over its plan's scheduling_weight) first; 0 = first come, first served.
    fair_scheduling: bool = True
    # With two or more tenants busy, an engine step computes at most this many tokens, so a
    # newcomer's first token does not wait behind another tenant's long prefill; 0 = off.
    contended_batch_tokens: int = 512
    # A stream whose client leaves this many tokens unread is parked (no engine slot, no
    # KV pages) until it reads half of them; 0 = never parked.
    max_unread_tokens: int = 256
    default_cache_ttl_seconds: int = 300
    metrics_tenant_labels: bool = True
    # /metrics only on this port when set (the API port then answers 404 for it).
    metrics_port: int | None = None
    # Bearer key /metrics requires wherever it is served (the admin key works too). Unset:
    # the metrics port is open to whoever reaches it; the API port asks for the admin key.
    metrics_key: str | None = field(default=None, repr=False)
    default_max_tokens: int = 256  # when a request names no max_tokens
    shutdown_timeout_s: int = 30  # SIGTERM: how long in-flight requests may drain
    # A connection idle, or still sending its headers or body, this long is closed.
    read_timeout_s: int = 30
    # Seconds a streamed answer waits for its client to accept bytes (a write that does
    # not complete) before it is cancelled and billed for what was produced; 0: no limit.
    write_timeout: float = 30.0
    # The kernel send buffer of a streamed answer's connection (0: the kernel's own, which on
    # a fast link grows to megabytes). Small, a client that stops reading is noticed within a
    # few hundred tokens: its writes block, the engine parks it, the write timeout cuts it.
    stream_send_buffer_bytes: int = 16384
    # Where usage waits, durable, while the ledger database is away ("": beside a SQLite
    # ledger as <file>-spool, else ./kvgate-spool); one per replica, on its own volume.
    spool_dir: str = ""
    spool_max_events: int = 10_000  # spooled events at which new requests get 503
    # A running request's usage so far is journalled in the spool directory at least this
    # often, and whenever it has made checkpoint_tokens more output tokens: a crash then
    # bills, at the next start, what was delivered up to the last checkpoint.
    checkpoint_interval_s: float = 1.0
    checkpoint_tokens: int = 64
    # PEM file of the Ed25519 key billing receipts are signed with ("": one made on the
    # first start in the spool directory, mode 0600, and reused). Replicas share one.
    receipt_key_file: str = ""
    log_level: str = "info"
    # How tool calls are read from the output: hermes | llama3 | mistral | none; "auto"
    # picks from the chat template (vLLM's flag of the same name).
    tool_call_parser: str = "auto"
    # How long a stored Responses API answer (``store``) can be read or continued.
    response_ttl_seconds: int = 30 * 86400
    # Names clients may use in ``model`` fields (comma-separated; the first is the one
    # reported); "" serves the model under its own id. vLLM's flag of the same name.
    served_model_name: str = ""
    max_model_len: int = 0  # caps the context (prompt + output); 0 = the model's own
    # Fair cache shares for every active tenant (off: one eviction order over all tenants,
    # the best hit rate; tenants that need isolation buy a reservation, README "Cache
    # reservations"). On, it closes the eviction side channel for every tenant at a cost
    # in total hit rate when many tenants share a small cache.
    cache_shares: bool = False
    # How often tenants' cache reservations are read from the ledger, applied and billed
    # (one usage row per reserved tenant and interval).
    reservation_bill_interval_s: int = 60
    # Explicit caches (/v1/caches) of a tenant with neither a device reservation nor a
    # quota may pin at most this percentage of the device tier together. Their storage is
    # billed, and expired ones unpinned, every reservation_bill_interval_s.
    explicit_cache_device_percent: int = 25
    # ... and every tenant's together (pinned pages are never evicted; the rest of the
    # device tier stays for running requests and the shared order)
    explicit_cache_total_percent: int = 50
    # Scale-out (``kvgate route``): where this replica publishes its cache events
    # (redis://HOST:PORT[/DB]; "" publishes none) and the id routers know it by ("" =
    # http://<host>:<port>).
    events_url: str = ""
    replica_id: str = ""
    # HMAC key the cache events are signed with (env only, KVGATE_EVENTS_SECRET; the same
    # value on every replica and router). Unset: the shared tier's secret. With neither,
    # a replica with --events-url refuses to start unless events_unsigned is set (then
    # anyone who can write to the stream can steer the routers; docs/architecture.md).
    events_secret: str | None = field(default=None, repr=False)
    events_unsigned: bool = False
    # The shared KV tier (Valkey/Redis, redis://[:PASSWORD@]HOST:PORT[/DB]; "" = none) and
    # its knobs: per-call timeout, write-behind queue bound, and the cost model's network
    # bandwidth (bytes/s) and prefill FLOP/s (0: assumed from the device). docs/architecture.md.
    shared_tier_url: str = field(default="", repr=False)
    shared_tier_timeout_ms: int = 50
    shared_tier_queue_bytes: int = 256 * 1024 * 1024
    shared_tier_bandwidth_bytes: int = 1_250_000_000
    shared_tier_compute_flops: int = 0
    # HMAC key for shared-tier entries (env only): entries written without it never verify.
    shared_tier_secret: str | None = field(default=None, repr=False)
    # The local disk tier below the host tier (docs/architecture.md, "Disk tier"): a
    # directory of this replica's own ("" = none; kept across restarts), the bytes of
    # records it may hold, the bytes per second its writers may write, and the read
    # bandwidth the cost model assumes (a block is read only where that beats computing it).
    disk_cache_dir: str = ""
    disk_cache_bytes: int = 16 * 1024**3
    disk_cache_write_bandwidth_bytes: int = 256 * 1024**2
    disk_cache_read_bandwidth_bytes: int = 2_000_000_000

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``KVGATE_*`` variables, then explicit (non-None) overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, f.type, raw)
        for k, v in overrides.items():
            if v is not None:
                values[k] = v
        return cls(**values)


def _coerce(name: str, typ: Any, raw: str) -> Any:
    t = str(typ).removesuffix(" | None")
    try:
        if t in ("int", "<class 'int'>"):
            return parse_bytes(raw) if name.endswith("_bytes") else int(raw)
        if t in ("bool", "<class 'bool'>"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if t in ("float", "<class 'float'>"):
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid number") from exc
    return raw


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
