"""The replicas a router sends to: who they are, whether they answer, how loaded they are.

Every ``POLL_S`` each replica's ``GET /admin/load`` is asked (with ``POLL_TIMEOUT_S``): it
is the health check and the load report in one. A replica that refuses the connection or
answers with an error, or that a request could not reach, leaves the pool at once and comes
back on its next good answer, so a dead replica is out within a second. A poll that only
times out is a busy replica's (a saturated CPU answers late, not never): it leaves after
``SLOW_POLLS`` such polls in a row, not before, so a loaded fleet does not flap and spill its
conversations' prefixes onto replicas that hold none of them. With ``--replicas-dns`` the set of replicas is the A
records of a (headless Service's) name, looked up every ``DNS_EVERY_S``.

The load report also carries the replica's last cache event number. A router's view of a
replica can never legitimately be ahead of it: the view's number, taken just before the
poll is sent, is at most what the replica had made then, which is at most what it reports.
A view found ahead (``on_view_ahead``) was fed events the replica never made. After each
good poll ``on_polled`` lets the router check the other way: a view that stays behind
what the replica had made (events lost with no later batch to show the gap).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

import aiohttp

from kvgate.gateway.protocol.wire import ReplicaLoad

log = logging.getLogger("kvgate.route")

POLL_S = 0.25
POLL_TIMEOUT_S = 0.5
SLOW_POLLS = 4  # polls in a row that time out before a replica leaves the pool
DNS_EVERY_S = 5.0


@dataclass
class Replica:
    url: str
    replica_id: str = ""  # as the replica reports it (its cache events carry it)
    epoch: str = ""  # changes when the replica restarts
    healthy: bool = False
    queue_depth: int = 0
    running: int = 0
    free_pages: int = 0
    device_pages: int = 0
    model_id: str = ""
    block_size: int = 0
    event_seq: int | None = None  # its last cache event's number, as last reported
    inflight: int = 0  # this router's requests on it now
    sent: int = 0  # requests this router sent it (started)
    slow_polls: int = 0  # polls in a row that timed out

    @property
    def load(self) -> float:
        """Requests running and queued: the replica's last report, or this router's own
        count when that is higher (it is fresher)."""
        return float(max(self.queue_depth + self.running, self.inflight))


NewEpoch = Callable[[Replica], Coroutine[None, None, None]]
ViewOf = Callable[[str], tuple[str, int] | None]  # replica id -> (epoch, event number)
ViewAhead = Callable[[Replica, int], None]  # the replica, the view's number found ahead
Polled = Callable[[Replica], None]


def describe(exc: BaseException) -> str:
    """An error of the router's HTTP client in an operator's words, for a log line. Never
    its ``repr``: aiohttp's response errors carry the request's headers, so the admin key
    (load polls, snapshots) or a tenant's key (a forwarded request) would be written to
    the log; and its reprs name TLS fields on plain links and parser codes that read like
    HTTP statuses."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port} ({reason})"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connecting timed out"
    if isinstance(exc, TimeoutError):
        return "nothing arrived within the timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection closed before an answer"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer's body broke off"
    if isinstance(exc, aiohttp.ContentTypeError):
        return "the answer was not JSON"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ReplicaPool:
    def __init__(self, urls: list[str], admin_key: str, session: aiohttp.ClientSession,
                 on_new_epoch: NewEpoch, dns: str | None = None,
                 view_of: ViewOf | None = None, on_view_ahead: ViewAhead | None = None,
                 on_polled: Polled | None = None) -> None:
        self.replicas: dict[str, Replica] = {u.rstrip("/"): Replica(u.rstrip("/")) for u in urls}
        self.admin_key = admin_key
        self.session = session
        self.dns = dns
        self._on_new_epoch = on_new_epoch
        self._view_of = view_of
        self._on_view_ahead = on_view_ahead
        self._on_polled = on_polled
        self._tasks: set[asyncio.Task[None]] = set()

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.healthy]

    def by_id(self, replica_id: str) -> Replica | None:
        return next((r for r in self.replicas.values() if r.replica_id == replica_id), None)

    def mark_down(self, replica: Replica, why: str) -> None:
        if replica.healthy:
            log.warning("replica %s left the pool: %s", replica.url, why)
        replica.healthy = False

    async def run(self) -> None:
        next_dns = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if self.dns and loop.time() >= next_dns:
                next_dns = loop.time() + DNS_EVERY_S
                await self._resolve(self.dns)
            await asyncio.gather(*(self.poll(r) for r in list(self.replicas.values())))
            await asyncio.sleep(POLL_S)

    async def poll(self, replica: Replica) -> None:
        view = (self._view_of(replica.replica_id)
                if self._view_of is not None and replica.replica_id else None)
        try:
            async with self.session.get(
                    replica.url + "/admin/load",
                    headers={"Authorization": f"Bearer {self.admin_key}"},
                    timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)) as resp:
                if resp.status != 200:
                    self.mark_down(replica, f"/admin/load answered {resp.status}")
                    return
                report = ReplicaLoad.parse(await resp.json())
        except TimeoutError:
            replica.slow_polls += 1
            if replica.slow_polls >= SLOW_POLLS:
                self.mark_down(replica, f"/admin/load timed out {replica.slow_polls} times "
                                        f"in a row ({POLL_TIMEOUT_S:g} s each)")
            return
        except (aiohttp.ClientError, ValueError, TypeError) as exc:
            self.mark_down(replica, f"/admin/load failed: {describe(exc)}")
            return
        replica.slow_polls = 0
        replica.queue_depth, replica.running = report.queue_depth, report.running
        replica.free_pages, replica.device_pages = report.free_pages, report.device_pages
        replica.model_id = report.model_id
        replica.block_size = report.block_size
        replica_id, epoch, event_seq = report.replica_id, report.epoch, report.event_seq
        replica.event_seq = event_seq
        if (view is not None and self._on_view_ahead is not None and event_seq is not None
                and replica_id == replica.replica_id and view[0] == epoch
                and view[1] > event_seq):
            self._on_view_ahead(replica, view[1])
        replica.replica_id = replica_id
        if not replica.healthy:
            log.info("replica %s is in the pool", replica.url)
        replica.healthy = True
        if epoch != replica.epoch:
            replica.epoch = epoch
            task = asyncio.create_task(self._on_new_epoch(replica))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._on_polled is not None:
            self._on_polled(replica)

    async def _resolve(self, hostport: str) -> None:
        host, _, port = hostport.rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            log.warning("cannot resolve --replicas-dns %s: %s", hostport, exc)
            return
        urls = set()
        for family, _, _, _, addr in infos:
            ip = str(addr[0])
            urls.add(f"http://[{ip}]:{port}" if family == socket.AF_INET6 else
                     f"http://{ip}:{port}")
        for url in urls - set(self.replicas):
            self.replicas[url] = Replica(url)
        for url in set(self.replicas) - urls:
            del self.replicas[url]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
