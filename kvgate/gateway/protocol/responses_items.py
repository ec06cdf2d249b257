"""Responses API input items → chat turns → prompt ids, and output items back.

A *turn* is a chat message as the chat template takes it (``role``, ``content``), plus,
for an assistant turn this server generated, ``ids``: the tokens the model sampled for it.
A stored response keeps its conversation as turns, so a continuation
(``previous_response_id``) renders the whole history again through the template and
splices each generated turn's own tokens back in where its text was: the new prompt then
starts with exactly the tokens the earlier request computed (prompt and output), and the
prefix cache serves all of it. Decoding and re-encoding text would not give those tokens
back in general (bytes that are not UTF-8, special tokens the decode drops).

Function tools: ``function_call`` input items become the ``tool_calls`` of an assistant
turn (consecutive ones, and an assistant message just before them, make one turn, as one
answer wrote them), ``function_call_output`` items ``tool`` turns. A generated turn with
calls keeps its sampled ids too; the template writes such a turn in its own form (the
arguments re-serialized), so its span in the prompt is found by rendering (``_span``) and
replaced by what the model wrote: a continuation that answers the calls still starts with
exactly what the earlier request computed.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvgate.gateway.protocol.errors import ApiError, bad_request

if TYPE_CHECKING:
    from kvgate.gateway.engine.tokenizer import TextTokenizer

Turn = dict[str, Any]
Template = Callable[[list[Turn]], list[int]]  # chat turns -> prompt ids (generation prompt on)

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def _content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"'{param}' must be a string or a list of content parts.",
                          param=param, code="invalid_type")
    texts = []
    for j, part in enumerate(content):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"'{p}' must be an object.", param=p, code="invalid_type")
        kind = part.get("type")
        if kind not in _TEXT_PARTS:
            raise bad_request(f"'{p}.type' is {str(kind)[:40]!r}; this server takes text "
                              "parts only ('input_text', 'output_text').", param=f"{p}.type",
                              code="unsupported_content")
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"'{p}.text' must be a string.", param=f"{p}.text",
                              code="invalid_type")
        texts.append(text)
    return "".join(texts)


def _string(item: dict[str, Any], key: str, param: str, limit: int | None = None) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value or (limit is not None and len(value) > limit):
        size = f" of 1 to {limit} characters" if limit else ""
        raise bad_request(f"'{param}.{key}' must be a non-empty string{size}.",
                          param=f"{param}.{key}", code="invalid_value")
    return value


def _arguments(raw: str) -> Any:
    """Arguments as templates read them (the transformers convention): a dict when they
    are a JSON object, else the text as sent."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, dict) else raw


def _function_call(item: dict[str, Any], param: str, turns: list[Turn],
                   call_ids: set[str]) -> None:
    call_id = _string(item, "call_id", param, 64)
    name = _string(item, "name", param, 128)
    args = item.get("arguments")
    if not isinstance(args, str):
        raise bad_request(f"'{param}.arguments' must be a string (the JSON arguments).",
                          param=f"{param}.arguments", code="invalid_type")
    call = {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": _arguments(args)}}
    call_ids.add(call_id)
    last = turns[-1] if turns else None
    if last is not None and last["role"] == "assistant":  # the same answer's text or calls
        last.setdefault("tool_calls", []).append(call)
    else:
        turns.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _add_item(item: Any, param: str, turns: list[Turn], call_ids: set[str]) -> None:
    if not isinstance(item, dict):
        raise bad_request(f"'{param}' must be an object.", param=param, code="invalid_type")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise bad_request(f"'{param}.role' must be user, assistant, system or developer "
                              f"(got {str(role)[:40]!r}).", param=f"{param}.role",
                              code="invalid_value")
        turns.append({"role": _ROLES[role],
                      "content": _content_text(item.get("content"), f"{param}.content")})
    elif kind == "function_call":
        _function_call(item, param, turns, call_ids)
    elif kind == "function_call_output":
        call_id = _string(item, "call_id", param, 64)
        if call_id not in call_ids:
            raise bad_request(f"No function call with call_id {call_id!r} comes before "
                              f"'{param}' (in 'input' or the previous response).",
                              param=f"{param}.call_id", code="invalid_value")
        output = item.get("output")
        text = output if isinstance(output, str) else _content_text(output, f"{param}.output")
        turns.append({"role": "tool", "tool_call_id": call_id, "content": text})
    else:
        raise bad_request(f"'{param}.type' is {str(kind)[:40]!r}; input items must be "
                          "'message', 'function_call' or 'function_call_output' items.",
                          param=f"{param}.type", code="invalid_value")


def call_ids_of(turns: list[Turn]) -> set[str]:
    return {c["id"] for t in turns for c in t.get("tool_calls") or []}


def input_turns(value: Any, earlier: list[Turn] | None = None) -> list[Turn]:
    """``input`` (a string, or a list of items) as chat turns; a 400 naming the bad item.
    A ``function_call_output`` must answer a call of ``earlier`` (the stored conversation)
    or of an item before it."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if value is None:
        raise bad_request("Missing required field 'input'.", param="input", code="missing_field")
    if not isinstance(value, list):
        raise bad_request("'input' must be a string or a list of input items.", param="input",
                          code="invalid_type")
    if not value:
        raise bad_request("'input' must hold at least one item.", param="input",
                          code="empty_input")
    turns: list[Turn] = []
    call_ids = call_ids_of(earlier or [])
    for i, item in enumerate(value):
        _add_item(item, f"input[{i}]", turns, call_ids)
    return turns


def plain(turns: list[Turn]) -> list[Turn]:
    """The turns as the chat template takes them (without the spliced ids)."""
    return [{k: v for k, v in t.items() if k != "ids"} for t in turns]


def render(tokenizer: TextTokenizer, turns: list[Turn],
           template: Template | None = None) -> list[int]:
    """The prompt ids of ``turns`` (with the generation prompt), each generated turn's
    body replaced by its own sampled ids. ``template``: the chat template over turns (with
    the request's tools), the tokenizer's own by default. A template that does not render
    the history as a prefix of the longer conversation (some strip earlier reasoning) keeps
    its text: the prompt is still right, the cache just hits less."""
    apply: Template = template or tokenizer.apply_chat_template
    messages = plain(turns)
    ids = apply(messages)
    for k in reversed(range(len(turns))):  # from the end: earlier offsets stay valid
        exact = turns[k].get("ids")
        if not exact or k == 0:
            continue
        try:
            span = _span(tokenizer, apply, messages, k, ids)
        except ApiError:  # a template that refuses a part of the conversation: no splice
            span = None
        if span is not None:
            ids[span[0]:span[1]] = exact
    return ids


_PROBE = "probe"


def _span(tokenizer: TextTokenizer, apply: Template, messages: list[Turn], k: int,
          ids: list[int]) -> tuple[int, int] | None:
    """Where the body of assistant turn ``k`` lies in ``ids`` (the whole rendering), or
    None when the template does not write it as a plain stretch after the earlier turns.
    A text turn's body is its text; a turn with tool calls is written in the template's
    own form, which ends where what it writes after any assistant turn (end of turn, the
    next turn's opening) begins: found with a plain stand-in turn in its place."""
    head = apply(messages[:k])
    start = len(head)
    if ids[:start] != head:
        return None
    if not messages[k].get("tool_calls"):
        text = tokenizer.encode(messages[k]["content"])
        end = start + len(text)
        return (start, end) if ids[start:end] == text else None
    probe = tokenizer.encode(_PROBE)
    stand_in = apply([*messages[:k], {"role": "assistant", "content": _PROBE}])
    if stand_in[:start] != head or stand_in[start:start + len(probe)] != probe:
        return None
    trailer = stand_in[start + len(probe):]
    upto = apply(messages[:k + 1])
    end = len(upto) - len(trailer)
    if end < start or upto[end:] != trailer or ids[:end] != upto[:end]:
        return None
    return start, end


def generated_ids(tokenizer: TextTokenizer, output_ids: list[int]) -> list[int]:
    """A turn's sampled ids without the end-of-turn token the template writes itself."""
    ids = list(output_ids)
    while ids and ids[-1] in tokenizer.eos_token_ids:
        ids.pop()
    return ids


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [] if status == "in_progress" else [text_part(text)]}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str,
                       status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def assistant_turn(output: list[dict[str, Any]]) -> Turn:
    """An answer's output items as the assistant turn a continuation renders."""
    text = "".join(part["text"] for item in output if item["type"] == "message"
                   for part in item["content"])
    turn: Turn = {"role": "assistant", "content": text}
    calls = [{"id": item["call_id"], "type": "function", "function": {
        "name": item["name"], "arguments": _arguments(item["arguments"])}}
        for item in output if item["type"] == "function_call"]
    if calls:
        turn["tool_calls"] = calls
    return turn


def response_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat-shaped function tools in the Responses API's flat shape."""
    return [{"type": "function", "name": t["function"]["name"],
             "description": t["function"].get("description"),
             "parameters": t["function"].get("parameters"),
             "strict": t["function"].get("strict")} for t in tools]
