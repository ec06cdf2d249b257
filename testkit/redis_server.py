"""A real ``redis-server`` (the OS package, as a user runs it) on a free loopback port.

Never the shared instance on 6379: each test or benchmark starts and stops its own, with
no persistence. ``missing()`` says why one cannot start here (tests skip with it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def missing() -> str | None:
    if binary() is None:
        return "redis-server is not installed (the OS package redis-server or valkey)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``maxmemory``: run it as an operator runs Valkey for the remote tier (that bound,
    ``allkeys-lru``). ``kill()`` then ``start()`` restarts it, empty, on the same port."""

    def __init__(self, maxmemory: str | None = None) -> None:
        self.port = 0
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="kvgate-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def start(self) -> RedisServer:
        exe = binary()
        if exe is None:
            raise RuntimeError(missing())
        self.port = self.port or free_port()
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir)]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.025)
        client.close()
        return self

    def kill(self) -> None:
        """Gone at once (SIGKILL), as a crashed server; ``start()`` brings it back."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
