"""What the asyncio side sends to the engine thread: one small typed message per intent."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvgate.gateway.engine.sequence import Sequence


@dataclass(frozen=True)
class Add:
    """Queue a new request."""

    seq: Sequence


@dataclass(frozen=True)
class Cancel:
    """The client went away: free everything the request holds."""

    request_id: str


@dataclass(frozen=True)
class Call:
    """Run ``fn`` on the engine thread, the cache store's owner. With a ``future`` the caller
    waits for the result; without one a failure is only logged."""

    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any] | None = None


@dataclass(frozen=True)
class Stop:
    """Finish every open request as cancelled and end the thread."""


Command = Add | Cancel | Call | Stop
