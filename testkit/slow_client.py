"""A client that stops reading: its request is sent in full, its answer never read.

On loopback the kernel grows a connection's send buffer to megabytes, which a test would
have to fill before a server's writes stop completing; ``small_send_buffers`` gives every
streamed answer (``BoundedResponse``, the server's and the router's) an 8 KiB one, as a
far client's full window leaves it, so a few hundred kilobytes suffice."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest


def small_send_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvgate.gateway.edge.transport import BoundedResponse

    real = BoundedResponse.prepare

    async def prepare(self: BoundedResponse, request: Any) -> Any:
        transport = request.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is not None and not self.prepared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return await real(self, request)

    monkeypatch.setattr(BoundedResponse, "prepare", prepare)


def stalled_request(port: int, path: str, body: dict[str, Any],
                    headers: dict[str, str]) -> socket.socket:
    """``body`` sent to ``127.0.0.1:port`` from a socket with a small receive buffer that
    the caller never reads (close it to hang up)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
            "Content-Type: application/json", f"Content-Length: {len(payload)}",
            *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    return sock


def big_stream_body(model: str, max_tokens: int) -> dict[str, Any]:
    """A streamed chat answer made big: 20 log probabilities a token, no early end."""
    return {"model": model, "max_tokens": max_tokens, "stream": True,
            "messages": [{"role": "user", "content": "write me a book"}],
            "logprobs": True, "top_logprobs": 20, "ignore_eos": True}
