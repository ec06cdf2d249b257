"""Agent clients against the real server: LangChain's ``ChatOpenAI`` (``bind_tools``,
``with_structured_output`` in each method) and LiteLLM's SDK with tools.

Forced calls and strict schemas make the demo model's random weights write valid calls and
valid JSON; ``json_mode`` (any JSON object, the client validates the fields) is driven by the
scripted model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from testkit import Tenant, ThreadServer
from testkit.scripted import ScriptedModel

langchain_openai = pytest.importorskip("langchain_openai")


class Weather(BaseModel):
    """The weather question, as a function's arguments."""

    city: Literal["Paris", "Oslo", "Lima"]
    metric: bool


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": Weather.model_json_schema()}}
ASK = "What is the weather in Paris?"


@pytest.fixture()
def scripted(server: ThreadServer) -> Iterator[ScriptedModel]:
    with ScriptedModel(server.state.engine) as model:
        yield model


def chat(server: ThreadServer, tenant: Tenant, model_id: str, **kw: Any) -> Any:
    return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key=tenant.key,
                                       model=model_id, max_retries=0, max_tokens=200, seed=3,
                                       **kw)


def test_langchain_bind_tools(server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    llm = chat(server, tenant, model_id).bind_tools(
        [Weather], tool_choice="Weather", parallel_tool_calls=False)
    msg = llm.invoke(ASK)
    [call] = msg.tool_calls
    assert call["name"] == "Weather" and call["id"].startswith("call_")
    Weather.model_validate(call["args"])
    # streamed, LangChain puts the chunks together into the same call
    streamed = None
    for part in llm.stream(ASK):
        streamed = part if streamed is None else streamed + part
    assert streamed is not None
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(call["name"], call["args"])]


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(server: ThreadServer, tenant: Tenant, model_id: str,
                                     method: str) -> None:
    out = chat(server, tenant, model_id).with_structured_output(Weather, method=method).invoke(ASK)
    assert isinstance(out, Weather)


def test_langchain_structured_output_json_mode(server: ThreadServer, tenant: Tenant,
                                               model_id: str, scripted: ScriptedModel) -> None:
    scripted.script(tenant, '{"city":"Oslo","metric":false}')
    out = chat(server, tenant, model_id).with_structured_output(
        Weather, method="json_mode").invoke(ASK + " Answer in JSON.")
    assert out == Weather(city="Oslo", metric=False)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic, about litellm's own types
def test_litellm_tools(server: ThreadServer, tenant: Tenant, model_id: str) -> None:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
    litellm = pytest.importorskip("litellm")
    kw: dict[str, Any] = {
        "model": f"openai/{model_id}", "api_base": server.url + "/v1", "api_key": tenant.key,
        "messages": [{"role": "user", "content": ASK}], "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "max_tokens": 200, "seed": 5}
    resp = litellm.completion(**kw)
    [call] = resp.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and resp.choices[0].finish_reason == "tool_calls"
    Weather.model_validate(json.loads(call.function.arguments))
    chunks = list(litellm.completion(**kw, stream=True))
    args = "".join(tc.function.arguments or "" for c in chunks
                   for tc in (c.choices[0].delta.tool_calls or []))
    assert json.loads(args) == json.loads(call.function.arguments)
