"""OpenAI function tools on /v1/chat/completions: the request's ``tools``, ``tool_choice``
and ``parallel_tool_calls``, tool calls and tool results in the history, and the tool calls
of the answer (``message.tool_calls``, streamed as ``delta.tool_calls``).

Parsing the model's output is ``tool_parsers.py``'s; this module is the OpenAI shape around it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

import jinja2

from kvgate.gateway.engine import InvalidGrammar, SamplingParams
from kvgate.gateway.protocol.errors import bad_request
from kvgate.gateway.protocol.render import ChatRenderer, GrammarCompiler
from kvgate.gateway.protocol.tool_parsers import (
    ParsedOutput,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    ToolStream,
    call_or_answer_grammar,
    forced_call_grammar,
    repeat_guard,
)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ToolRequest:
    """What the request asked of tools. ``choice``: none | auto | required | a function's
    name. ``parser`` None: the output is not parsed for calls (tool_choice none, or a
    server without a parser)."""

    tools: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "auto"
    parallel: bool = True
    parser: ToolParser | None = None

    @property
    def forced(self) -> bool:
        return self.choice not in ("none", "auto")

    def stream(self) -> ToolStream:
        return ToolStream(self.parser)


def tool_request(body: dict[str, Any], parser: ToolParser | None) -> ToolRequest:
    """The request's tools, checked; ``parser``: the server's (None: it parses no calls)."""
    tools = body.get("tools")
    choice_raw = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls",
                          code="invalid_type")
    if tools is None or tools == []:
        if choice_raw not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs 'tools'.", param="tool_choice",
                              code="invalid_value")
        return ToolRequest(choice="none")
    if not isinstance(tools, list):
        raise bad_request("'tools' must be a list of function tools.", param="tools",
                          code="invalid_type")
    checked = checked_tools(body)
    names = [t["function"]["name"] for t in checked]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise bad_request(f"Two tools are named '{dup}'; tool names must be unique.",
                          param="tools", code="invalid_value")
    choice = _choice(choice_raw, names)
    if parser is None and choice not in ("none", "auto"):
        raise bad_request("This server parses no tool calls (--tool-call-parser none), so "
                          "it cannot force one; use tool_choice 'auto' or 'none'.",
                          param="tool_choice", code="unsupported_parameter")
    return ToolRequest(checked, choice, parallel, None if choice == "none" else parser)


def checked_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's ``tools``, each checked (a 400 names the first bad one)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    return [checked_tool(t, f"tools[{i}]") for i, t in enumerate(tools)]


def render_prompt(renderer: ChatRenderer, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None) -> list[int]:
    """The chat template over messages and tools; a template that refuses them (Llama 3.1:
    one tool call per turn; Mistral: roles must alternate) is the client's 400."""
    try:
        return renderer.render_chat(messages, tools=tools or None)
    except jinja2.TemplateError as exc:
        raise bad_request(f"This model's chat template refused the messages: {exc}",
                          param="messages", code="invalid_value") from None


def checked_tool(tool: Any, param: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" \
            or not isinstance(tool.get("function"), dict):
        raise bad_request(f"'{param}' must be {{\"type\": \"function\", \"function\": {{...}}}}"
                          "; only function tools are supported.", param=param,
                          code="invalid_value")
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(f"'{param}.function.name' must be 1 to 64 letters, digits, '_' or "
                          "'-'.", param=f"{param}.function.name", code="invalid_value")
    if not isinstance(fn.get("description", ""), str):
        raise bad_request(f"'{param}.function.description' must be a string.",
                          param=f"{param}.function.description", code="invalid_type")
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise bad_request(f"'{param}.function.parameters' must be a JSON schema of "
                              "type 'object'.", param=f"{param}.function.parameters",
                              code="invalid_value")
        _check_schema(params, f"{param}.function.parameters")
    if not isinstance(fn.get("strict", False), (bool, type(None))):
        raise bad_request(f"'{param}.function.strict' must be a boolean.",
                          param=f"{param}.function.strict", code="invalid_type")
    out = {k: v for k, v in fn.items() if k in ("name", "description", "parameters", "strict")}
    return {"type": "function", "function": out}


def _check_schema(schema: dict[str, Any], param: str) -> None:
    """The parts of a JSON schema a template and a grammar read: properties an object,
    required a list of strings."""
    props = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(props, dict) or not all(isinstance(v, (dict, bool)) for v in props.values()):
        raise bad_request(f"'{param}.properties' must map names to schemas.", param=param,
                          code="invalid_value")
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise bad_request(f"'{param}.required' must be a list of property names.",
                          param=param, code="invalid_value")


def _choice(raw: Any, names: list[str]) -> str:
    if raw is None:
        return "auto"
    if raw in ("none", "auto", "required"):
        return str(raw)
    if isinstance(raw, dict) and raw.get("type") == "function" \
            and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if name not in names:
            raise bad_request(f"'tool_choice' names the function {str(name)[:64]!r}, which is "
                              "not among 'tools'.", param="tool_choice", code="invalid_value")
        return str(name)
    raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or "
                      "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                      param="tool_choice", code="invalid_value")


def forced_sampling(grammars: GrammarCompiler, req: ToolRequest,
                    sampling: SamplingParams) -> SamplingParams:
    """The grammar tools put on the output (compiled here: a schema the grammar engine
    cannot take is a 400 before anything runs), as OpenAI behaves:

    - tool_choice required or a named function: the output is calls in the model's form
      whose arguments follow the function's schema; a named function is called exactly
      once. A ``response_format`` shapes content, and a forced turn has none: it applies
      to the later turns' answers, not to this one.
    - tool_choice auto with a ``response_format``: either calls or an answer that follows
      the format (one grammar with both branches), so an agent with tools and an output
      type can still call its tools.
    """
    if req.parser is None or not req.tools or req.choice == "none":
        return sampling
    sampling = repeat_guard(sampling, req.parser)
    if req.forced:
        name = None if req.choice == "required" else req.choice
        spec = forced_call_grammar(req.tools, name, req.parser,
                                   parallel=req.parallel and name is None)
    elif sampling.structured is not None and sampling.structured.kind in ("json_schema",
                                                                          "json_object"):
        spec = call_or_answer_grammar(req.tools, req.parser, req.parallel, sampling.structured)
    else:
        return sampling
    try:
        grammars.compile(spec)
    except InvalidGrammar as exc:
        raise bad_request(f"A tool's parameters schema cannot be enforced: {exc}",
                          param="tools", code="invalid_value") from None
    return replace(sampling, structured=spec)


def history_message(m: dict[str, Any], role: str, param: str, call_ids: set[str],
                    text: str) -> dict[str, Any]:
    """An assistant message with ``tool_calls`` or a ``tool`` message, as templates read
    them (the transformers convention: arguments as a dict when they are a JSON object)."""
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or call_id not in call_ids:
            raise bad_request(f"'{param}.tool_call_id' must name a tool call of an earlier "
                              "assistant message.", param=f"{param}.tool_call_id",
                              code="invalid_value")
        return {"role": "tool", "tool_call_id": call_id, "content": text}
    calls = m.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        raise bad_request(f"'{param}.tool_calls' must be a non-empty list.",
                          param=f"{param}.tool_calls", code="invalid_type")
    out = []
    for j, call in enumerate(calls):
        p = f"{param}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str) \
                or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments"), str):
            raise bad_request(f"'{p}' must be {{\"id\", \"type\": \"function\", \"function\": "
                              "{\"name\", \"arguments\": a JSON string}}.", param=p,
                              code="invalid_value")
        call_ids.add(call["id"])
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": fn["name"], "arguments": _arguments(fn["arguments"])}})
    return {"role": "assistant", "content": text, "tool_calls": out}


def _arguments(raw: str) -> Any:
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, dict) else raw


def call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def kept(req: ToolRequest, calls: list[ToolCall]) -> list[ToolCall]:
    """``parallel_tool_calls: false``: the first call only."""
    return calls if req.parallel else calls[:1]


def message(parsed: ParsedOutput, req: ToolRequest) -> tuple[dict[str, Any], bool]:
    """The answer's ``message`` and whether it holds tool calls."""
    calls = kept(req, parsed.calls)
    msg: dict[str, Any] = {"role": "assistant", "content": parsed.content or None,
                           "refusal": None}
    if calls:
        msg["tool_calls"] = [call_json(c) for c in calls]
    elif msg["content"] is None:
        msg["content"] = ""
    return msg, bool(calls)


def stream_deltas(d: ToolCallDelta) -> list[dict[str, Any]]:
    """One call as OpenAI streams it: a delta with its index, id, type, name and empty
    arguments, then the arguments."""
    c = d.call
    head = {"index": d.index, "id": c.id, "type": "function",
            "function": {"name": c.name, "arguments": ""}}
    return [{"tool_calls": [head]},
            {"tool_calls": [{"index": d.index, "function": {"arguments": c.arguments}}]}]


class ToolDeltas:
    """A streamed answer's text deltas → OpenAI ``delta`` objects: content, and each tool
    call as ``stream_deltas`` writes it. ``finish_reason`` says ``tool_calls`` when the
    answer ended normally after calls."""

    def __init__(self, req: ToolRequest) -> None:
        self.req = req
        self._stream = req.stream()
        self.calls = 0

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self._stream.feed(text))

    def finish(self) -> list[dict[str, Any]]:
        return self._deltas(self._stream.finish())

    def _deltas(self, deltas: list[str | ToolCallDelta]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for d in deltas:
            if isinstance(d, str):
                out.append({"content": d})
            elif self.req.parallel or d.index == 0:
                self.calls += 1
                out += stream_deltas(d)
        return out

    def finish_reason(self, reason: str) -> str:
        return finish_reason(reason, self.calls > 0)


def finish_reason(reason: str, has_calls: bool) -> str:
    """``tool_calls`` when the answer holds a call (the parser hands out only complete,
    valid ones), even if the token limit came right after it: an agent loop that checks
    for ``tool_calls`` must not drop a finished call."""
    return "tool_calls" if has_calls and reason in ("stop", "length") else reason
