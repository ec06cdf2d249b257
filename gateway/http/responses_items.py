"""Responses API input items → chat turns → prompt ids, and output items back.

A *turn* is a chat message as the chat template takes it (``role``, ``content``), plus,
for an assistant turn this server generated, ``ids``: the tokens the model sampled for it.
A stored response keeps its conversation as turns, so a continuation
(``previous_response_id``) renders the whole history again through the template and
splices each generated turn's own tokens back in where its text was: the new prompt then
starts with exactly the tokens the earlier request computed (prompt and output), and the
prefix cache serves all of it. Decoding and re-encoding text would not give those tokens
back in general (bytes that are not UTF-8, special tokens the decode drops).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from gateway.http.errors import bad_request

if TYPE_CHECKING:
    from gateway.engine.tokenizer import TextTokenizer

Turn = dict[str, Any]

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


def _item_turn(item: Any, param: str) -> Turn:
    if not isinstance(item, dict):
        raise bad_request(f"'{param}' must be an object.", param=param, code="invalid_type")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise bad_request(f"'{param}.role' must be user, assistant, system or developer "
                              f"(got {str(role)[:40]!r}).", param=f"{param}.role",
                              code="invalid_value")
        return {"role": _ROLES[role],
                "content": _content_text(item.get("content"), f"{param}.content")}
    if kind in ("function_call", "function_call_output"):
        raise bad_request(f"'{param}' is a {kind} item; function tools are not available on "
                          "/v1/responses on this server yet.", param=f"{param}.type",
                          code="unsupported_parameter")
    raise bad_request(f"'{param}.type' is {str(kind)[:40]!r}; input items must be 'message' "
                      "items.", param=f"{param}.type", code="invalid_value")


def input_turns(value: Any) -> list[Turn]:
    """``input`` (a string, or a list of items) as chat turns; a 400 naming the bad item."""
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
    return [_item_turn(item, f"input[{i}]") for i, item in enumerate(value)]


def plain(turns: list[Turn]) -> list[Turn]:
    """The turns as the chat template takes them (without the spliced ids)."""
    return [{k: v for k, v in t.items() if k != "ids"} for t in turns]


def render(tokenizer: TextTokenizer, turns: list[Turn]) -> list[int]:
    """The prompt ids of ``turns`` (with the generation prompt), each generated turn's
    text replaced by its own sampled ids. A template that does not render the history as
    a prefix of the longer conversation (some strip earlier reasoning) keeps its text: the
    prompt is still right, the cache just hits less."""
    messages = plain(turns)
    ids = tokenizer.apply_chat_template(messages)
    for k in reversed(range(len(turns))):  # from the end: earlier offsets stay valid
        exact = turns[k].get("ids")
        if not exact or k == 0:
            continue
        head = tokenizer.apply_chat_template(messages[:k])
        text = tokenizer.encode(messages[k]["content"])
        end = len(head) + len(text)
        if ids[:len(head)] == head and ids[len(head):end] == text:
            ids[len(head):end] = exact
    return ids


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
