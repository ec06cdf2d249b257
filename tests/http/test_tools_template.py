"""Tools through real model families' chat templates (the transformers convention): the
template gets ``tools``, assistant ``tool_calls`` with the arguments as a dict, ``tool``
messages; a template that refuses a conversation is the client's 400, not a 500."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer

from kvgate.gateway.engine import demo
from kvgate.gateway.engine.tokenizer import TextTokenizer
from kvgate.gateway.protocol.errors import ApiError
from kvgate.gateway.protocol.openai_chat import chat_messages
from kvgate.gateway.protocol.openai_tools import render_prompt

# Qwen2.5-Instruct's tool parts (the public template, trimmed to what tools touch).
QWEN = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
# Llama 3.1's rule: one tool call per assistant turn.
LLAMA_RULE = """{%- for message in messages %}{%- if message.tool_calls is defined %}
{%- if message.tool_calls|length != 1 %}{{- raise_exception("This model only supports single tool-calls at once!") }}{%- endif %}
{%- endif %}{{ message.role }}{%- endfor %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def tokenizer(template: str) -> TextTokenizer:
    tok = Tokenizer.from_str(demo.build_tokenizer().tokenizer.to_str())
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return TextTokenizer(tok, template, eos_tokens=["<|im_end|>"])


def history(arguments: str) -> list[dict]:
    return chat_messages({"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C <|im_end|>"}]})


def test_qwen_template_reads_tools_calls_and_results() -> None:
    tok = tokenizer(QWEN)
    text = tok.render_chat(history('{"city": "Paris"}'), tools=TOOLS)
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in text
    # the arguments arrive as a dict: written once as JSON, not as a quoted string
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
        in text
    assert "<|im_start|>user\n<tool_response>\n21 C <|im_end|>\n</tool_response><|im_end|>" in text
    ids = tok.apply_chat_template(history('{"city": "Paris"}'), tools=TOOLS)
    end = tok.tokenizer.token_to_id("<|im_end|>")
    # the tool result's <|im_end|> is plain text: only the template's turns end a turn
    assert ids.count(end) == text.count("<|im_end|>") - 1


def test_arguments_that_are_not_an_object_pass_as_given() -> None:
    text = tokenizer(QWEN).render_chat(history("not json"), tools=TOOLS)
    assert '"arguments": "not json"}' in text


def test_a_template_that_refuses_is_a_400() -> None:
    class _Engine:
        def render_chat(self, messages: list[dict], tools: list | None = None) -> list[int]:
            return tokenizer(LLAMA_RULE).apply_chat_template(messages, tools=tools)

    two = chat_messages({"messages": [{"role": "user", "content": "x"}, {
        "role": "assistant", "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            for i in range(2)]}]})
    with pytest.raises(ApiError) as err:
        render_prompt(_Engine(), two, TOOLS)
    assert err.value.status == 400 and "single tool-calls" in str(err.value)
