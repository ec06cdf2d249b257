"""The remote tier: KV pages in Valkey/Redis that every replica writes and reads.

- Key ``<prefix><block hash hex>``, value a ``RecordCodec`` record (layout signature,
  parent hash, namespace, tokens, the namespace's epoch, the page; with a secret, an HMAC),
  ``PX`` the block's TTL. A fetch accepts a value only if every field agrees.
- Epochs: ``flush_namespace`` raises the namespace's epoch (``<prefix>epoch:<ns>``, signed
  with a secret); a fetch reads only entries of the current one, and an epoch lower than
  one this replica has seen is refused (``parse_epoch``).
- Nothing here fails a request: writes go to a bounded write-behind queue drained by one
  thread, fetches run off the engine thread with timeouts, and a ``Breaker`` stops both
  after repeated errors.
- ``CostModel``: a fetch is made only where moving the pages beats recomputing them.

docs/architecture.md (Remote tier) has the reasons, and what epochs do not catch.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis
import torch

from kvgate.cachestore.record import (
    FetchedBlock,
    RecordCodec,
    RemoteFetch,
    RemoteRecord,
    layout_signature,
)
from kvgate.cachestore.stats import RemoteTierStats
from kvgate.kernels.layout import KVLayout

log = logging.getLogger("kvgate.cache.shared")

__all__ = ["Breaker", "CostModel", "FetchedBlock", "ModelShape", "RemoteFetch", "RemoteRecord",
           "RemoteTier", "RemoteTierConfig", "layout_signature"]

# at most 18 digits: below 1e18, so a new epoch (one more) always fits the header's 63 bits,
# however high a value someone wrote (without a secret) pushed a replica's memory
_EPOCH = re.compile(rb"([1-9][0-9]{0,17})(?:\.([0-9a-f]{64}))?")
_MAX_EPOCH = (1 << 63) - 1
_SEEN_NAMESPACES = 100_000  # namespaces whose highest epoch a replica remembers


def _ttl_ms(ttl_s: float) -> int:
    """A block's ``PX``: at least 1 ms, at most a year (an infinite or absurd TTL must not
    make Valkey refuse the whole pipeline)."""
    if math.isnan(ttl_s):
        return 1
    return int(max(1.0, min(ttl_s * 1000, 365 * 86400 * 1000.0)))


@dataclass(frozen=True)
class RemoteTierConfig:
    """``kvgate serve --shared-tier-*``; see docs/architecture.md (Remote tier)."""

    url: str
    timeout_ms: int = 50  # each Valkey call, and the deadline of one fetch
    queue_bytes: int = 256 * 1024 * 1024  # page bytes waiting to be written, at most
    max_fetch_blocks: int = 512  # blocks one request may fetch ...
    max_fetch_bytes: int = 256 * 1024 * 1024  # ... and page bytes (4 fetches run at once)
    fetch_batch_blocks: int = 16  # blocks per MGET
    # Cost model inputs: the network's bytes per second (10 Gb/s by default), its round
    # trip, and the FLOP/s prefill reaches here (0: 2e14 on CUDA, 5e10 on CPU).
    bandwidth_bytes: int = 1_250_000_000
    rtt_s: float = 0.0005
    compute_flops: float = 0.0
    breaker_failures: int = 3  # consecutive errors that open the breaker
    breaker_cooldown_s: float = 5.0
    secret: str = field(default="", repr=False)  # HMAC key for entries ("": none)
    key_prefix: str = "kvgate:kv:"


@dataclass(frozen=True)
class ModelShape:
    """What prefill costs per token: ``2 * params`` for the matmuls plus attention's
    ``4 * layers * q_heads * head_dim`` per position attended to."""

    params: int  # weights used per token (without the input embedding)
    num_layers: int
    num_q_heads: int
    head_dim: int


class CostModel:
    """Fetch blocks ``[start, start + n)`` from the remote tier only if
    ``rtt + n * page_bytes / bandwidth < prefill_flops(those positions) / compute_flops``.

    Example (the thresholds are only these two numbers): Llama-3-8B in bf16 on an H200
    has 2 MiB pages of 16 tokens and about 2.3e11 FLOPs per block; at 2e14 FLOP/s a block
    takes 1.1 ms to compute and 1.7 ms to move over 10 Gb/s, so it is not fetched (at
    25 Gb/s it is). The demo model's 64 KiB page takes 0.05 ms to move and ~7 ms to
    compute on a CPU: always fetched.
    """

    def __init__(self, layout: KVLayout, shape: ModelShape, bandwidth_bytes: float,
                 rtt_s: float, compute_flops: float) -> None:
        self.block_size = layout.block_size
        self.page_bytes = layout.page_bytes
        self.shape = shape
        self.bandwidth = float(bandwidth_bytes)
        self.rtt_s = float(rtt_s)
        self.compute_flops = float(compute_flops)

    def compute_s(self, start_block: int, n_blocks: int) -> float:
        """Seconds to prefill blocks ``[start_block, start_block + n_blocks)``."""
        first = start_block * self.block_size
        tokens = n_blocks * self.block_size
        positions = tokens * first + tokens * (tokens - 1) / 2  # sum of positions attended
        s = self.shape
        flops = 2 * s.params * tokens + 4 * s.num_layers * s.num_q_heads * s.head_dim * positions
        return flops / self.compute_flops

    def fetch_s(self, n_blocks: int) -> float:
        return self.rtt_s + n_blocks * self.page_bytes / self.bandwidth

    def worth_fetching(self, start_block: int, n_blocks: int) -> bool:
        return n_blocks > 0 and self.fetch_s(n_blocks) < self.compute_s(start_block, n_blocks)


class Breaker:
    """Closed until ``failures`` errors in a row; then open for ``cooldown_s``, after which
    one call is let through (half-open): success closes it, failure opens it again."""

    def __init__(self, failures: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = max(1, failures)
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._errors = 0
        self._opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    @property
    def blocked(self) -> bool:
        """Whether ``allow`` would refuse now (it is open and its trial is not due), without
        taking the trial: a writer that checks this before queueing still gets to make the
        trial call once the cool-down is over, so writes alone can close it again."""
        with self._lock:
            return self._opened_at is not None and (
                self._trial or self.clock() - self._opened_at < self.cooldown_s)

    def allow(self) -> bool:
        with self._lock:
            if self._opened_at is None:
                return True
            if self._trial or self.clock() - self._opened_at < self.cooldown_s:
                return False
            self._trial = True
            return True

    def release(self) -> None:
        """The call let through learnt nothing about Valkey (it failed before or after the
        network): the next call after the cool-down is let through instead."""
        with self._lock:
            self._trial = False

    def success(self) -> None:
        with self._lock:
            self._errors, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._errors += 1
            self._trial = False
            if self._opened_at is not None or self._errors >= self.failures:
                self._opened_at = self.clock()


@dataclass(frozen=True)
class _Flush:
    namespace: str


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = dict.fromkeys(
            ("hits", "hit_bytes", "misses", "rejected", "skipped", "writes", "write_bytes",
             "dropped", "errors"), 0)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for k, v in deltas.items():
                self.values[k] += v


class RemoteTier:
    """The Valkey client of one replica: a write-behind queue and verified fetches."""

    name = "shared"  # how a block found here is reported (``PrefixMatch.blocks``)

    def __init__(self, config: RemoteTierConfig, layout: KVLayout, model_id: str,
                 client: redis.Redis | None = None) -> None:
        self.config = config
        self.layout = layout
        self.codec = RecordCodec(layout, model_id, config.secret.encode())
        self.signature = self.codec.signature
        timeout = config.timeout_ms / 1000
        self.client = client or redis.Redis.from_url(
            config.url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False, health_check_interval=0)
        self.breaker = Breaker(config.breaker_failures, config.breaker_cooldown_s)
        self.counters = _Counters()
        self._secret = config.secret.encode()
        self._epoch_secret = hmac.new(self._secret, b"kvgate shared tier epoch v1",
                                      hashlib.sha256).digest() if self._secret else b""
        self._seen: OrderedDict[str, int] = OrderedDict()  # namespace -> highest epoch seen
        self._seen_lock = threading.Lock()
        self._queue: queue.Queue[RemoteRecord | _Flush | None] = queue.Queue()
        self._queued_bytes = 0
        self._pending = 0  # items queued or being written (what ``drain`` waits for)
        self._queue_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="kvgate-shared-tier",
                                        daemon=True)
        self._writer.start()

    # -- keys and values --------------------------------------------------------------------
    def key(self, block_hash: bytes) -> str:
        return self.config.key_prefix + block_hash.hex()

    def epoch_key(self, namespace: str) -> str:
        return self.config.key_prefix + "epoch:" + namespace

    def epoch_value(self, namespace: str, epoch: int) -> bytes:
        """What the epoch key holds: the number, and with a secret its HMAC (bound to the
        namespace: one namespace's value copied to another's key does not verify)."""
        if not self._secret:
            return b"%d" % epoch
        return b"%d.%s" % (epoch, self._epoch_mac(namespace, epoch).hex().encode())

    def _epoch_mac(self, namespace: str, epoch: int) -> bytes:
        return hmac.new(self._epoch_secret, b"%s\0%d" % (namespace.encode(), epoch),
                        hashlib.sha256).digest()

    def parse_epoch(self, namespace: str, value: object) -> int | None:
        """The namespace's epoch as Valkey holds it: 0 when there is none (no entry is
        current), None when it cannot be trusted (not a value ``epoch_value`` makes, a MAC
        that does not verify, or lower than one this replica has seen: played back). Never
        an error: its entries are misses, and the next write replaces it."""
        if value is None:
            return 0
        m = _EPOCH.fullmatch(value) if isinstance(value, bytes) else None
        if m is None:
            return None
        epoch = int(m.group(1))
        if self._secret:
            mac = m.group(2)
            if mac is None or not hmac.compare_digest(bytes.fromhex(mac.decode()),
                                                      self._epoch_mac(namespace, epoch)):
                return None
        with self._seen_lock:
            seen = self._seen.get(namespace, 0)
            if epoch < seen:
                return None
            self._remember(namespace, epoch)
        return epoch

    def _remember(self, namespace: str, epoch: int) -> None:
        """(under ``_seen_lock``)"""
        if epoch > self._seen.get(namespace, 0):
            self._seen[namespace] = epoch
        self._seen.move_to_end(namespace)
        while len(self._seen) > _SEEN_NAMESPACES:
            self._seen.popitem(last=False)

    def _new_epoch(self, namespace: str, current: int | None, remember: bool = True) -> int:
        """Higher than the current one and any this replica has seen, and than the last
        flush anywhere (microseconds since 1970). ``remember``: this replica will set it
        (not merely offer it with ``SET NX``, which another replica's offer may beat)."""
        with self._seen_lock:
            epoch = min(_MAX_EPOCH, max(time.time_ns() // 1000, (current or 0) + 1,
                                        self._seen.get(namespace, 0) + 1))
            if remember:
                self._remember(namespace, epoch)
        return epoch

    def encode(self, record: RemoteRecord, epoch: int = 0) -> bytes:
        return self.codec.encode(record, epoch)

    def decode(self, value: bytes | None, parent_hash: bytes, namespace: str,
               tokens: bytes, epoch: int = 0) -> torch.Tensor | None:
        """The page stored in ``value`` if it is exactly this block; else None (a miss)."""
        return self.codec.decode(value, parent_hash, namespace, tokens, epoch)

    # -- writing ------------------------------------------------------------------------------
    def put(self, records: Sequence[RemoteRecord]) -> int:
        """Queue records for writing, in order, while the queue has room (never blocks).
        → how many were taken (a prefix of ``records``)."""
        taken = 0
        for record in records:
            nbytes = self.layout.page_bytes
            with self._queue_lock:
                if self.breaker.blocked or self._queued_bytes + nbytes > self.config.queue_bytes:
                    break
                self._queued_bytes += nbytes
                self._pending += 1
            self._queue.put(record)
            taken += 1
        if taken < len(records):
            self.counters.add(dropped=len(records) - taken)
        return taken

    def room(self) -> int:
        """Blocks ``put`` would take now (0 while the breaker refuses calls): callers copy only
        those pages off the device."""
        if self.breaker.blocked:
            return 0
        with self._queue_lock:
            return max(0, self.config.queue_bytes - self._queued_bytes) // self.layout.page_bytes

    def flush_namespace(self, namespace: str) -> None:
        """Make every entry of ``namespace`` written so far a miss, on every replica (its
        epoch goes up, after the writes queued before this call). Never blocks."""
        with self._queue_lock:
            self._pending += 1
        self._queue.put(_Flush(namespace))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[RemoteRecord] = []
            while item is not None:
                if isinstance(item, _Flush):
                    self._write(batch)
                    batch = []
                    self._flush(item.namespace)
                    self._done(1)
                else:
                    batch.append(item)
                if len(batch) == 64:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            self._write(batch)
            if item is None:
                return

    def _done(self, n: int) -> None:
        with self._queue_lock:
            self._pending -= n

    def _flush(self, namespace: str) -> None:
        key = self.epoch_key(namespace)
        try:
            (raw,) = self.client.mget([key])  # MGET: a key of another type reads as none
            epoch = self._new_epoch(namespace, self.parse_epoch(namespace, raw))
            self.client.set(key, self.epoch_value(namespace, epoch))
        except (redis.RedisError, OSError) as exc:
            if not isinstance(exc, redis.ResponseError):
                self.breaker.failure()
            self.counters.add(errors=1)
            log.error("shared tier flush of %s failed (its entries stay until their TTL): %r",
                      namespace, exc)

    def _epochs_for_writing(self, namespaces: list[str]) -> dict[str, int]:
        """Each namespace's current epoch; made where there is none (``SET NX``: the first
        writer's wins) and replaced where it cannot be trusted."""
        keys = [self.epoch_key(ns) for ns in namespaces]
        epochs: dict[str, int] = {}
        missing: list[str] = []
        spoiled: list[str] = []
        for ns, raw in zip(namespaces, self.client.mget(keys), strict=True):
            epoch = self.parse_epoch(ns, raw)
            if epoch:
                epochs[ns] = epoch
            else:
                (missing if epoch == 0 else spoiled).append(ns)
        if missing:
            pipe = self.client.pipeline(transaction=False)
            for ns in missing:
                offer = self._new_epoch(ns, None, remember=False)
                pipe.set(self.epoch_key(ns), self.epoch_value(ns, offer), nx=True)
            pipe.mget([self.epoch_key(ns) for ns in missing])
            for ns, raw in zip(missing, pipe.execute()[-1], strict=True):
                epoch = self.parse_epoch(ns, raw)
                if epoch:
                    epochs[ns] = epoch
                else:  # of another type, or replaced in between
                    spoiled.append(ns)
        if spoiled:
            log.error("shared tier: the epoch key of %s was not one kvgate wrote (overwritten, "
                      "played back, or written with another KVGATE_SHARED_TIER_SECRET); "
                      "replaced by a new epoch, so none of the namespace's entries so far "
                      "are used", sorted(spoiled))
            pipe = self.client.pipeline(transaction=False)
            for ns in spoiled:
                epochs[ns] = self._new_epoch(ns, None)
                pipe.set(self.epoch_key(ns), self.epoch_value(ns, epochs[ns]))
            pipe.execute()
        return epochs

    def _write(self, batch: list[RemoteRecord]) -> None:
        if not batch:
            return
        try:
            self._write_batch(batch)
        finally:
            self._done(len(batch))

    def _write_batch(self, batch: list[RemoteRecord]) -> None:
        with self._queue_lock:
            self._queued_bytes -= len(batch) * self.layout.page_bytes
        if not self.breaker.allow():
            self.counters.add(dropped=len(batch))
            return
        try:
            epochs = self._epochs_for_writing(sorted({r.namespace for r in batch}))
            pipe = self.client.pipeline(transaction=False)
            for r in batch:
                pipe.set(self.key(r.block_hash), self.encode(r, epochs[r.namespace]),
                         px=_ttl_ms(r.ttl_s))
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self.breaker.failure()
            self.counters.add(errors=1, dropped=len(batch))
            log.warning("shared tier write of %d blocks failed: %r", len(batch), exc)
            return
        except Exception:  # not the network's fault: the blocks are lost, the writer lives on
            self.breaker.release()
            self.counters.add(errors=1, dropped=len(batch))
            log.exception("shared tier write of %d blocks failed", len(batch))
            return
        self.breaker.success()
        self.counters.add(writes=len(batch), write_bytes=len(batch) * self.layout.page_bytes)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until the write-behind queue is empty (tests, shutdown); → whether it is."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._queue_lock:
                if self._pending == 0:
                    return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=2 * self.config.timeout_ms / 1000 + 1)
        self.client.close()

    # -- fetching ----------------------------------------------------------------------------
    def fetch(self, namespace: str, parent_hash: bytes, hashes: Sequence[bytes],
              tokens: Sequence[bytes]) -> list[FetchedBlock]:
        """A prompt's blocks after ``parent_hash`` (their ``hashes`` and ``tokens``), as many
        consecutive ones as Valkey holds and verify. Network I/O: never call it on the
        engine thread."""
        if not self.breaker.allow():
            return []
        out: list[FetchedBlock] = []
        try:
            self._read(namespace, parent_hash, hashes, tokens, out)
        except (redis.RedisError, OSError) as exc:
            self.breaker.failure()
            self.counters.add(errors=1)
            log.warning("shared tier fetch failed: %r", exc)
        except Exception:  # a value nothing expected: a miss, and the breaker is not stuck
            self.breaker.release()
            self.counters.add(errors=1)
            log.exception("shared tier fetch failed")
            out = []
        else:
            self.breaker.success()
        return out

    def _read(self, namespace: str, parent_hash: bytes, hashes: Sequence[bytes],
              tokens: Sequence[bytes], out: list[FetchedBlock]) -> None:
        """MGET batch by batch into ``out`` until a block is missing or fails to verify,
        or the deadline passes."""
        deadline = time.monotonic() + self.config.timeout_ms / 1000
        step = self.config.fetch_batch_blocks
        epoch = 0
        for lo in range(0, len(hashes), step):
            if lo and time.monotonic() > deadline:
                return
            batch = range(lo, min(len(hashes), lo + step))
            keys = [self.key(hashes[i]) for i in batch]
            if lo == 0:  # the namespace's epoch rides along with the first batch
                first, *values = self.client.mget([self.epoch_key(namespace), *keys])
                parsed = self.parse_epoch(namespace, first)
                if parsed is None:  # not one kvgate wrote: nothing of it can be trusted
                    self.counters.add(rejected=1)
                    return
                if parsed == 0:  # no epoch (never written, or the key was evicted)
                    self.counters.add(misses=1)
                    return
                epoch = parsed
            else:
                values = self.client.mget(keys)
            for i, value in zip(batch, values, strict=True):
                parent = parent_hash if i == 0 else hashes[i - 1]
                page = self.decode(value if isinstance(value, bytes) else None, parent,
                                   namespace, tokens[i], epoch)
                if page is None:
                    self.counters.add(misses=int(value is None), rejected=int(value is not None))
                    return
                out.append(FetchedBlock(hashes[i], tokens[i], page))

    def stats(self) -> RemoteTierStats:
        with self.counters.lock:
            v = dict(self.counters.values)
        with self._queue_lock:
            queued = self._queued_bytes
        return RemoteTierStats(available=not self.breaker.is_open, queued_bytes=queued, **v)
