"""The real default model (``smollm2``) behind the server, driven by the clients users have:
the official OpenAI and Anthropic SDKs and LangChain. What a user sees must mean something:
facts come out right, structured outputs and forced tool calls finish well inside their
budget, tools work on a chat template that has none, and a multi-turn agent loop reads
its earlier turns from the cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from testkit import Tenant, ThreadServer
from testkit.shapes import check_openai

MiB = 1 << 20
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                   "required": ["zone"]}}}


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with ThreadServer(model="smollm2", device="cpu", device_cache_bytes=64 * MiB,
                      host_cache_bytes=64 * MiB) as s:
        yield s


@pytest.fixture(scope="module")
def tenant(server: ThreadServer) -> Tenant:
    return server.admin.tenant("real")


@pytest.fixture(scope="module")
def client(server: ThreadServer, tenant: Tenant) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0) as c:
        yield c


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_models_list_names_the_real_model_and_how_it_takes_tools(client: openai.OpenAI):
    (model,) = client.models.list().data
    assert model.id == "smollm2"
    note = (model.model_extra or {}).get("note", "")
    assert "random" not in note and "Hermes" in note


@pytest.mark.parametrize("question, expect", [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of France? Answer in one sentence.", "Paris"),
    ("What is the capital of Japan? Answer in one sentence.", "Tokyo"),
])
def test_openai_sdk_gets_facts_right(client: openai.OpenAI, question: str, expect: str):
    r = client.chat.completions.create(model="smollm2", messages=ask(question), max_tokens=60)
    check_openai("ChatCompletion", r.model_dump(mode="json", exclude_unset=True))
    assert expect in (r.choices[0].message.content or "")
    assert r.choices[0].finish_reason == "stop"


def test_anthropic_sdk_gets_a_fact_right_and_the_repeat_reads_the_cache(server, tenant):
    with anthropic.Anthropic(base_url=server.url, api_key=tenant.key, max_retries=0) as a:
        system = "You answer geography questions briefly. " * 4
        first = a.messages.create(model="smollm2", max_tokens=40, system=system,
                                  messages=ask("What is the capital of France?"))
        again = a.messages.create(model="smollm2", max_tokens=40, system=system,
                                  messages=ask("What is the capital of France?"))
    assert "Paris" in first.content[0].text and first.stop_reason == "end_turn"
    assert again.content[0].text == first.content[0].text
    assert again.usage.cache_read_input_tokens > 0


def test_json_schema_without_bounds_finishes_inside_the_budget(client: openai.OpenAI):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="smollm2", max_tokens=100,
        messages=ask("Alice is 30 years old. Give her name and age as JSON."),
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 50
    answer = json.loads(r.choices[0].message.content or "")
    assert answer["name"] == "Alice" and isinstance(answer["age"], int)  # 135M: the age varies


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_forced_tool_call_finishes_inside_the_budget(client: openai.OpenAI, choice: Any):
    r = client.chat.completions.create(
        model="smollm2", max_tokens=100, tools=[WEATHER, TIME], tool_choice=choice,
        messages=ask("What is the weather in Oslo right now?"))
    calls = r.choices[0].message.tool_calls or []
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.usage.completion_tokens < 80
    assert calls and calls[0].function.name == "get_weather"  # (required may add others)
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    if isinstance(choice, dict):  # a named function is called exactly once
        assert len(calls) == 1


@pytest.mark.parametrize("stream", [True])  # the engine cuts the same way unstreamed
def test_a_forced_call_the_model_repeats_is_answered_once(client: openai.OpenAI, stream: bool):
    """Under required with parallel calls allowed, SmolLM2 writes its call again and again;
    the repeat ends the answer, and one the token limit cuts is never sent as text, on
    chat completions (streamed or not) and on the Responses API alike."""
    kwargs: dict[str, Any] = dict(
        model="smollm2", max_tokens=60, tools=[WEATHER], tool_choice="required",
        messages=ask("What is the weather in Paris right now?"))
    if stream:
        content, names, finish = "", [], None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            for choice in chunk.choices:
                content += choice.delta.content or ""
                names += [c.function.name for c in choice.delta.tool_calls or []
                          if c.function and c.function.name]
                finish = choice.finish_reason or finish
    else:
        r = client.chat.completions.create(**kwargs)
        message = r.choices[0].message
        content, finish = message.content or "", r.choices[0].finish_reason
        names = [c.function.name for c in message.tool_calls or []]
    assert names == ["get_weather"] and finish == "tool_calls"
    assert "<tool" not in content and "</tool" not in content
    resp = client.responses.create(
        model="smollm2", max_output_tokens=60, tool_choice="required",
        tools=[{"type": "function", **WEATHER["function"]}],
        input="What is the weather in Paris right now?")
    assert resp.status == "completed"
    assert [item.type for item in resp.output] == ["function_call"]


def test_tools_with_a_response_format_under_auto_call_or_answer(client: openai.OpenAI):
    """The agents' pattern (tools and an output type): under auto the answer is either a
    call or content that follows the format; forced, the call comes first and the format
    is for the later turn's answer (no 400)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "strict": True, "schema": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "summary": {"type": "string"}},
        "required": ["city", "summary"], "additionalProperties": False}}}
    r = client.chat.completions.create(
        model="smollm2", max_tokens=120, tools=[WEATHER], tool_choice="auto",
        response_format=fmt, messages=ask("What is the weather in Oslo right now?"))
    message = r.choices[0].message
    if message.tool_calls:
        assert message.tool_calls[0].function.name == "get_weather"
    else:
        assert set(json.loads(message.content or "")) == {"city", "summary"}
    forced = client.chat.completions.create(
        model="smollm2", max_tokens=120, tools=[WEATHER], tool_choice="required",
        response_format=fmt, messages=ask("What is the weather in Oslo right now?"))
    assert forced.choices[0].finish_reason == "tool_calls"


def test_a_multi_turn_tool_loop_reads_earlier_turns_from_the_cache(client: openai.OpenAI):
    messages = ask("What is the weather in Oslo right now? Use the tool.")
    first = client.chat.completions.create(
        model="smollm2", max_tokens=80, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=messages)
    (call,) = first.choices[0].message.tool_calls or []
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"city": "Oslo", "temperature_c": -3})})
    second = client.chat.completions.create(model="smollm2", max_tokens=60, tools=[WEATHER],
                                            messages=messages)
    assert second.choices[0].finish_reason in ("stop", "tool_calls")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens // 16 * 16 - 16 > 0


def test_langchain_binds_tools_and_loops(server: ThreadServer, tenant: Tenant):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return json.dumps({"city": city, "temperature_c": -3})

    llm = ChatOpenAI(model="smollm2", base_url=server.url + "/v1", api_key=tenant.key,
                     max_tokens=80, max_retries=0)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    history: list[Any] = [HumanMessage("What is the weather in Oslo?")]
    reply = bound.invoke(history)
    assert [c["name"] for c in reply.tool_calls] == ["get_weather"]
    assert reply.tool_calls[0]["args"] == {"city": "Oslo"}
    history += [reply, ToolMessage(get_weather.invoke(reply.tool_calls[0]["args"]),
                                   tool_call_id=reply.tool_calls[0]["id"])]
    final = llm.bind_tools([get_weather]).invoke(history)
    assert final.response_metadata["finish_reason"] in ("stop", "tool_calls")
    usage = final.response_metadata["token_usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


def _agents_model(server: ThreadServer, tenant: Tenant, api: str) -> tuple[Any, Any]:
    import agents

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=tenant.key, max_retries=0)
    model = (agents.OpenAIResponsesModel("smollm2", client) if api == "responses"
             else agents.OpenAIChatCompletionsModel("smollm2", client))
    agents.set_tracing_disabled(True)
    return client, model


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_openai_agents_sdk_calls_a_tool(server: ThreadServer, tenant: Tenant, api: str):
    """The OpenAI Agents SDK's tool loop on both of its model classes: the agent's call
    comes back whole (no run to max_tokens: a call the model repeats word for word ends
    the answer), the SDK runs the tool and ends with its result."""
    import asyncio

    import agents

    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"{city}: -3 C, snow"

    async def run() -> Any:
        client, model = _agents_model(server, tenant, api)
        agent = agents.Agent(
            name="weather", instructions="You report the weather.", tools=[get_weather],
            model=model, tool_use_behavior="stop_on_first_tool",
            model_settings=agents.ModelSettings(tool_choice="required", max_tokens=120))
        try:
            return await agents.Runner.run(agent, "What is the weather in Oslo?", max_turns=2)
        finally:
            await client.close()

    result = asyncio.run(run())
    assert calls == ["Oslo"]
    assert result.final_output == "Oslo: -3 C, snow"
    (turn,) = result.raw_responses
    assert turn.usage.output_tokens < 80


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_openai_agents_sdk_output_type_over_two_turns(server: ThreadServer, tenant: Tenant,
                                                       api: str):
    """An agent with an ``output_type`` answers with a valid instance, and the next turn of
    the conversation (the SDK's ``to_input_list``) reads the first from the cache."""
    import asyncio

    import agents
    from pydantic import BaseModel

    class Capital(BaseModel):
        country: str
        capital: str

    async def run() -> tuple[Any, Any]:
        client, model = _agents_model(server, tenant, api)
        agent = agents.Agent(name="geo", instructions="You answer geography questions.",
                             output_type=Capital, model=model,
                             model_settings=agents.ModelSettings(max_tokens=60))
        try:
            first = await agents.Runner.run(agent, "What is the capital of France?")
            second = await agents.Runner.run(agent, [
                *first.to_input_list(), {"role": "user", "content": "And the capital of Japan?"}])
            return first, second
        finally:
            await client.close()

    first, second = asyncio.run(run())
    assert isinstance(first.final_output, Capital) and first.final_output.capital == "Paris"
    assert isinstance(second.final_output, Capital)
    assert second.raw_responses[0].usage.input_tokens_details.cached_tokens > 0
