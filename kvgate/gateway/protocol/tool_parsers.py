"""Tool calls in model output: one parser per model family, incremental for streams.

A model writes its tool calls as text in its family's form:

- ``hermes`` (Hermes, Qwen2/2.5/3, the demo model): ``<tool_call>{"name": …, "arguments":
  {…}}</tool_call>``, any number of them, after optional text;
- ``llama3`` (Llama 3.1+ JSON tool calling): the whole answer is ``{"name": …,
  "parameters": {…}}`` (calls separated by ``;``), possibly after ``<|python_tag|>``;
- ``mistral``: ``[TOOL_CALLS][{"name": …, "arguments": {…}}, …]``.

``<|python_tag|>`` and ``[TOOL_CALLS]`` are special tokens, which the engine's decode drops,
so the llama3 and mistral parsers also take their JSON at the start of the answer without
the marker.

One state machine serves both ways of answering: ``ToolStream.feed`` takes text deltas and
returns content deltas and whole tool calls; a non-streamed answer is the same machine fed
the whole text at once, so a streamed answer reassembles to exactly the non-streamed one.
Text that may still become a tool call is held until decided; a call is sent once its JSON
is complete and well-formed. A malformed or unfinished call is returned as text, never an
error: the client sees what the model wrote.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kvgate.gateway.engine.sampling import SamplingParams
    from kvgate.gateway.engine.structured import StructuredSpec

ParserName = Literal["hermes", "llama3", "mistral"]
PARSERS: tuple[str, ...] = ("hermes", "llama3", "mistral")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")


@dataclass(frozen=True)
class _Body:
    """What a parser made of the text after a call's start marker."""

    calls: list[ToolCall] | None  # None: not a call (malformed): the text is content
    consumed: int  # characters of the text the calls (or the malformed part) took


class ToolParser:
    """One model family's tool-call form. ``start`` finds where a call may begin,
    ``body`` reads the calls that follow it."""

    name: ParserName = "hermes"
    markers: tuple[str, ...] = ()
    # (open, close) around each call, when the form has both: the engine then ends an
    # answer at a call that repeats an earlier one (``SamplingParams.repeat_block``)
    block: tuple[str, str] | None = None

    def start(self, text: str, at_output_start: bool) -> tuple[int, int] | None:
        """(index, marker length) of the first call start in ``text``, or None."""
        found = [(i, len(m)) for m in self.markers if (i := text.find(m)) >= 0]
        return min(found) if found else None

    def hold(self, text: str, at_output_start: bool) -> int:
        """How many trailing characters of ``text`` (no call start in it) might begin one."""
        for n in range(min(len(text), max(map(len, self.markers), default=0)), 0, -1):
            if any(m.startswith(text[-n:]) for m in self.markers):
                return n
        return 0

    def body(self, text: str, final: bool) -> _Body | None:
        """The calls at the start of ``text`` (after a marker); None: need more text."""
        raise NotImplementedError

    def emit(self, name: str, arguments: dict[str, Any]) -> str:
        """How this family writes one call (chat history, grammars)."""
        raise NotImplementedError


def _call(obj: Any, args_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


_DECODER = json.JSONDecoder()


def _json_at(text: str, i: int) -> tuple[Any, int] | None:
    """The JSON value starting at ``text[i]`` and the index after it; None: incomplete or
    not JSON (the caller tells the two apart by whether more text can come)."""
    try:
        return _DECODER.raw_decode(text, i)
    except ValueError:
        return None


class HermesParser(ToolParser):
    name: ParserName = "hermes"
    markers = ("<tool_call>",)
    END = "</tool_call>"
    block = (markers[0], END)

    def body(self, text: str, final: bool) -> _Body | None:
        end = text.find(self.END)
        if end < 0:
            if not final:
                return None
            inner, consumed = text, len(text)  # unclosed at the end: a call only if whole JSON
        else:
            inner, consumed = text[:end], end + len(self.END)
        try:
            call = _call(json.loads(inner), "arguments")
        except ValueError:
            call = None
        return _Body([call] if call else None, consumed)

    def emit(self, name: str, arguments: dict[str, Any]) -> str:
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments},
                                            ensure_ascii=False) + "\n</tool_call>"


class _JsonParser(ToolParser):
    """Calls written as bare JSON at the start of the answer (the marker is optional)."""

    args_key = "arguments"
    opener = "{"

    def start(self, text: str, at_output_start: bool) -> tuple[int, int] | None:
        found = super().start(text, at_output_start)
        if found is not None:
            return found
        i = _skip_ws(text, 0)
        if at_output_start and text[i:i + 1] == self.opener:
            return i, 0
        return None

    def hold(self, text: str, at_output_start: bool) -> int:
        if at_output_start and not text.strip():
            return len(text)  # whitespace before what may be a JSON call
        return super().hold(text, at_output_start)

    def _values(self, text: str, final: bool) -> tuple[list[Any], int] | None:
        raise NotImplementedError

    def body(self, text: str, final: bool) -> _Body | None:
        read = self._values(text, final)
        if read is None:
            return None if not final else _Body(None, len(text))
        values, consumed = read
        calls = [_call(v, self.args_key) for v in values]
        ok = [c for c in calls if c is not None]
        if not ok or len(ok) != len(calls):
            return _Body(None, consumed)
        return _Body(ok, consumed)


class Llama3Parser(_JsonParser):
    name: ParserName = "llama3"
    markers = ("<|python_tag|>",)
    args_key = "parameters"

    def _values(self, text: str, final: bool) -> tuple[list[Any], int] | None:
        values, i = [], _skip_ws(text, 0)
        while True:
            got = _json_at(text, i)
            if got is None:
                return None
            values.append(got[0])
            i = _skip_ws(text, got[1])
            if text[i:i + 1] != ";":
                break
            i = _skip_ws(text, i + 1)
        if i < len(text) or final:  # something follows, or nothing more will come
            return values, i
        return None  # a ';' and another call may still follow

    def emit(self, name: str, arguments: dict[str, Any]) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)


class MistralParser(_JsonParser):
    name: ParserName = "mistral"
    markers = ("[TOOL_CALLS]",)
    opener = "["

    def _values(self, text: str, final: bool) -> tuple[list[Any], int] | None:
        got = _json_at(text, _skip_ws(text, 0))
        if got is None:
            return None
        value, end = got
        return (value if isinstance(value, list) else [value]), end

    def emit(self, name: str, arguments: dict[str, Any]) -> str:
        return "[TOOL_CALLS]" + json.dumps([{"name": name, "arguments": arguments}],
                                           ensure_ascii=False)


_BY_NAME: dict[str, type[ToolParser]] = {
    "hermes": HermesParser, "llama3": Llama3Parser, "mistral": MistralParser}


_ALIASES = {"qwen": "hermes", "qwen2": "hermes", "llama": "llama3"}


def parser_for(template_text: str | None, override: str | None = None) -> ToolParser | None:
    """The parser a model's chat template implies, or the one ``override`` names
    (``--tool-call-parser``: hermes | llama3 | mistral | none; auto or None: guess).
    None: tool calls are not parsed (the output is text)."""
    if override and override != "auto":
        if override == "none":
            return None
        override = _ALIASES.get(override, override)
        if override not in _BY_NAME:
            raise ValueError(f"unknown tool-call parser {override!r}; "
                             f"known: {', '.join(PARSERS)} (qwen = hermes), none, auto")
        return _BY_NAME[override]()
    t = template_text or ""
    if "[TOOL_CALLS]" in t:
        return MistralParser()
    if "<|python_tag|>" in t or ('"parameters"' in t and "ipython" in t):
        return Llama3Parser()
    return HermesParser()  # Hermes/Qwen form: also the demo model's, and the common default


@dataclass(frozen=True)
class ToolCallDelta:
    """One finished call, in output order (``index`` counts calls from 0)."""

    index: int
    call: ToolCall


Delta = str | ToolCallDelta


class ToolStream:
    """Text deltas in → content deltas (``str``) and finished calls out."""

    def __init__(self, parser: ToolParser | None) -> None:
        self.parser = parser
        self.pending = ""  # text not yet decided
        self.inside = ""  # the marker of the call being read ("" outside a call)
        self.in_call = False
        self.calls = 0
        self.content_sent = False  # any non-whitespace content went out
        self.blank = ""  # whitespace held back: dropped if it only surrounds calls

    def feed(self, text: str) -> list[Delta]:
        if self.parser is None:
            return [text] if text else []
        self.pending += text
        return self._run(final=False)

    def finish(self) -> list[Delta]:
        out = self._run(final=True) if self.parser is not None else []
        if self.blank and not self.calls:
            out.append(self.blank)
        self.blank = ""
        return out

    def _content(self, text: str, out: list[Delta]) -> None:
        """Trailing whitespace waits for what follows: dropped if only calls do."""
        body = text.rstrip()
        if not body:
            self.blank += text
            return
        out.append(self.blank + body)
        self.blank = text[len(body):]
        self.content_sent = True

    def _run(self, final: bool) -> list[Delta]:
        parser = self.parser
        assert parser is not None
        out: list[Delta] = []
        while self.pending:
            if not self.in_call:
                at_start = not self.content_sent and not self.calls
                found = parser.start(self.pending, at_start)
                if found is None:
                    keep = 0 if final else parser.hold(self.pending, at_start)
                    self._content(self.pending[:len(self.pending) - keep], out)
                    self.pending = self.pending[len(self.pending) - keep:]
                    return out
                i, n = found
                self._content(self.pending[:i], out)
                self.inside, self.pending, self.in_call = self.pending[i:i + n], self.pending[i + n:], True
            body = parser.body(self.pending, final)
            if body is None:
                return out
            taken, self.pending = self.pending[:body.consumed], self.pending[body.consumed:]
            self.in_call = False
            if body.calls is None:  # not a call after all: what the model wrote is content
                self._content(self.inside + taken, out)
            else:
                if self.blank and self.calls == 0 and not self.content_sent:
                    self.blank = ""  # whitespace before the first call
                for call in body.calls:
                    out.append(ToolCallDelta(self.calls, call))
                    self.calls += 1
            self.inside = ""
        if final and self.in_call:  # a marker and nothing after it
            self._content(self.inside, out)
            self.in_call = False
        return out


@dataclass
class ParsedOutput:
    content: str
    calls: list[ToolCall]


def parse_all(parser: ToolParser | None, text: str) -> ParsedOutput:
    """A whole answer: the same machine as a stream, fed everything at once."""
    stream = ToolStream(parser)
    deltas = stream.feed(text) + stream.finish()
    return ParsedOutput("".join(d for d in deltas if isinstance(d, str)),
                        [d.call for d in deltas if isinstance(d, ToolCallDelta)])


def repeat_guard(sampling: SamplingParams, parser: ToolParser) -> SamplingParams:
    """``sampling`` with the parser's call markers as ``repeat_block``, for a request that
    offers tools: a call repeated word for word ends the answer."""
    return sampling if parser.block is None else replace(sampling, repeat_block=parser.block)


def forced_call_grammar(tools: list[dict[str, Any]], name: str | None, parser: ToolParser,
                        parallel: bool = True) -> StructuredSpec:
    """A Lark grammar (llguidance syntax) whose every sentence is a valid call in
    ``parser``'s form: of the function ``name``, or of any of ``tools`` (tool_choice
    "required"); one call, or several when ``parallel``. Arguments follow each function's
    JSON schema (``%json``)."""
    from kvgate.gateway.engine.structured import StructuredSpec

    calls, rules = _calls_rules(tools, name, parser, parallel)
    return StructuredSpec(kind="lark", spec="\n".join([f"start: {calls}", *rules]) + "\n")


def _calls_rules(tools: list[dict[str, Any]], name: str | None, parser: ToolParser,
                 parallel: bool) -> tuple[str, list[str]]:
    """The expression of one or more calls in ``parser``'s form, and the rules it uses."""
    from kvgate.gateway.engine.structured import json_schema_spec

    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    rules, alts = [], []
    for i, fn in enumerate(functions):
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        if not any(k in schema for k in ("properties", "additionalProperties",
                                          "patternProperties", "anyOf", "oneOf", "allOf",
                                          "$ref")):
            # {"type": "object"} alone is how a tool without arguments is often declared
            # (Anthropic's input_schema); forced open, a small model writes keys until
            # max_tokens. Free-form arguments say so: "additionalProperties": true.
            schema = {**schema, "properties": {}, "additionalProperties": False}
        schema = json.loads(json_schema_spec(_closed(schema), bool(fn.get("strict"))).spec)
        # compact JSON: free whitespace would let a model loop on blanks
        _compact(schema)
        rules.append(f"args_{i}: %json {json.dumps(schema)}")
        alts.append(_call_rule(parser, fn["name"], f"args_{i}"))
    sep = {"hermes": '"\\n"', "llama3": '"; "', "mistral": '", "'}[parser.name]
    many = f"call ({sep} call)*" if parallel else "call"
    calls = f'"[" {many} "]"' if parser.name == "mistral" else many
    return calls, ["call: " + " | ".join(alts), *rules]


def call_or_answer_grammar(tools: list[dict[str, Any]], parser: ToolParser, parallel: bool,
                           answer: StructuredSpec) -> StructuredSpec:
    """Tool calls (any of ``tools``, as ``forced_call_grammar`` writes them) or an answer
    that follows ``answer`` (a JSON schema or any JSON object): tool_choice auto with a
    response_format."""
    from kvgate.gateway.engine.structured import StructuredSpec

    if answer.kind not in ("json_schema", "json_object"):
        raise ValueError(f"a {answer.kind} answer cannot be combined with tool calls")
    calls, rules = _calls_rules(tools, None, parser, parallel)
    schema: dict[str, Any] = (json.loads(answer.spec) if answer.kind == "json_schema"
                              else {"type": "object"})
    _compact(schema)
    return StructuredSpec(kind="lark", spec="\n".join([
        "start: calls | answer", f"calls: {calls}", *rules,
        f"answer: %json {json.dumps(schema)}"]) + "\n")


def _compact(schema: dict[str, Any]) -> None:
    """Compact JSON (free whitespace would let a model loop on blanks); an ``x-guidance``
    that is not an object is left as sent, for the grammar engine to refuse (a 400)."""
    guidance = schema.get("x-guidance")
    if guidance is None or isinstance(guidance, dict):
        schema["x-guidance"] = {**(guidance or {}), "whitespace_flexible": False}


def _call_rule(parser: ToolParser, name: str, args_rule: str) -> str:
    key = "parameters" if parser.name == "llama3" else "arguments"
    head = json.dumps(json.dumps({"name": name, key: 0})[:-2])  # '{"name": "x", "key": '
    if parser.name == "hermes":
        return f'"<tool_call>\\n" {head} {args_rule} "}}\\n</tool_call>"'
    return f'{head} {args_rule} "}}"'


def _closed(schema: Any) -> Any:
    """Objects that declare their properties get no others unless they say so: a forced
    call writes the arguments the function declares (JSON schema's default would let a
    model add keys until it runs out of tokens)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("items"), dict):
        out["items"] = _closed(out["items"])
    return out
