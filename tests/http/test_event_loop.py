"""``--event-loop``: uvloop by default, in ``kvgate serve`` and in its engine core process;
asyncio's own loop when asked; anything else refused before the process starts."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import openai
import psutil
import pytest

from kvgate.gateway import loop
from kvgate.gateway.config import Settings
from testkit import ProcessServer


async def _which() -> str:
    await asyncio.sleep(0)
    return loop.running()


@pytest.mark.parametrize("name", loop.LOOPS)
def test_each_loop_runs_the_loop_it_names(name: str) -> None:
    assert loop.run(_which(), name) == name


def test_a_loop_that_is_neither_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("uvloop | asyncio")):
        loop.factory("trio")
    with pytest.raises(ValueError, match=re.escape("uvloop | asyncio")):
        Settings.from_env({"KVGATE_EVENT_LOOP": "trio"})
    assert Settings.from_env({"KVGATE_EVENT_LOOP": "asyncio"}).http.event_loop == "asyncio"
    assert Settings.from_env({}).http.event_loop == "uvloop"


def _maps_uvloop(proc: psutil.Process) -> bool:
    return any("uvloop" in Path(m.path).parts for m in proc.memory_maps())


@pytest.mark.parametrize("event_loop", loop.LOOPS)
def test_serve_and_its_engine_core_run_the_loop_asked_for(tmp_path: Path,
                                                          event_loop: str) -> None:
    with ProcessServer(tmp_path, api_servers=1, event_loop=event_loop) as srv:
        tenant = srv.admin.tenant("loop")
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
        chunks = list(client.chat.completions.create(
            model="demo", max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Which loop?"}]))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
        assert srv.proc is not None
        server = psutil.Process(srv.proc.pid)
        cores = [p for p in server.children(recursive=True)
                 if "kvgate.gateway.engine.core" in " ".join(p.cmdline())]
        assert len(cores) == 1
        assert _maps_uvloop(server) == _maps_uvloop(cores[0]) == (event_loop == "uvloop")
