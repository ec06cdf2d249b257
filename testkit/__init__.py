"""The toolkit the tests and the benchmarks share: the gateway on loopback (in this process
or as a ``kvgate serve`` child), its admin API, request bodies, SSE, usage in ledger terms.
Response-shape checks against the official SDKs' models are in ``testkit.shapes``
(imported on its own: it loads both SDKs)."""

from testkit.admin import ADMIN_KEY, Admin, ApiKey, Session, Tenant
from testkit.bodies import KINDS, PATHS, ApiRequest, request_body
from testkit.client import Outcome, billed_usage, final_usage, send
from testkit.server import MiB, ProcessServer, Server, ThreadServer, server_settings
from testkit.sse import DONE, SseEvent, aiter_sse, iter_sse

__all__ = [
    "ADMIN_KEY", "DONE", "KINDS", "PATHS", "Admin", "ApiKey", "ApiRequest", "MiB", "Outcome",
    "ProcessServer", "Server", "Session", "SseEvent", "Tenant", "ThreadServer", "aiter_sse",
    "billed_usage", "final_usage", "iter_sse", "request_body", "send", "server_settings",
]
