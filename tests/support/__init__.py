"""The toolkit the tests and the benchmarks share: the gateway on loopback (in this process
or as a ``kvgate serve`` child), its admin API, request bodies, SSE, usage in ledger terms.
Response-shape checks against the official SDKs' models are in ``tests.support.shapes``
(imported on its own: it loads both SDKs)."""

from tests.support.admin import ADMIN_KEY, Admin, ApiKey, Session, Tenant
from tests.support.bodies import KINDS, PATHS, ApiRequest, request_body
from tests.support.client import Outcome, billed_usage, final_usage, send
from tests.support.server import MiB, ProcessServer, Server, ThreadServer, server_settings
from tests.support.sse import DONE, SseEvent, aiter_sse, iter_sse

__all__ = [
    "ADMIN_KEY", "DONE", "KINDS", "PATHS", "Admin", "ApiKey", "ApiRequest", "MiB", "Outcome",
    "ProcessServer", "Server", "Session", "SseEvent", "Tenant", "ThreadServer", "aiter_sse",
    "billed_usage", "final_usage", "iter_sse", "request_body", "send", "server_settings",
]
