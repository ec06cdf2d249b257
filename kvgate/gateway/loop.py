"""The event loop every kvgate process runs (``kvgate serve``, its engine core, ``kvgate
route``): uvloop's by default, asyncio's own with ``--event-loop asyncio``.

uvloop runs the same asyncio programs on libuv: its sockets, transports and callback queue
are C, where asyncio's selector loop is Python. On the project's 2-core bench machine that
buys a few hundredths of a millisecond per router hop, less than the noise of a chat
request (docs/architecture.md, "Event loop"); it is the loop the production servers of this
kind run, and asyncio's stays one setting away. Where uvloop is not installed (a platform it
has no wheel for), asyncio's loop runs and the process says so once. A bottom layer of its
own: the settings, the engine core and both front ends read it, and it imports nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("uvloop", "asyncio")  # the choices of the --event-loop setting

log = logging.getLogger("kvgate.loop")


def factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory for ``name`` (one of ``LOOPS``); None: asyncio's default loop."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: asyncio's event loop runs instead")
            return None
        return uvloop.new_event_loop
    if name != "asyncio":
        raise ValueError(f"event loop {name!r} is not one of {' | '.join(LOOPS)}")
    return None


def running() -> str:
    """The name in ``LOOPS`` of the loop running now (a child process runs the same)."""
    kind = type(asyncio.get_running_loop()).__module__
    return "uvloop" if kind.split(".")[0] == "uvloop" else "asyncio"


def run(main: Coroutine[Any, Any, T], name: str = "uvloop") -> T:
    """``asyncio.run(main)`` on the loop ``name`` names."""
    with asyncio.Runner(loop_factory=factory(name)) as runner:
        return runner.run(main)
