"""Tool-call parsers: each model family's form, through the real tokenizer path.

A scripted output (the text a model of that family would write) is encoded with a
tokenizer that has the family's special markers, decoded token by token with the engine's
``IncrementalDecoder`` (which drops special tokens, as the engine does), and fed to the
streaming parser one delta at a time. The stream must give exactly what the whole text gives
at once; malformed and partial calls come back as text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from kvgate.gateway.engine import demo
from kvgate.gateway.engine.tokenizer import IncrementalDecoder, TextTokenizer
from kvgate.gateway.protocol.tool_parsers import (
    HermesParser,
    Llama3Parser,
    MistralParser,
    ParsedOutput,
    ToolCallDelta,
    ToolParser,
    ToolStream,
    parse_all,
    parser_for,
)

MARKERS = ["<|python_tag|>", "[TOOL_CALLS]"]


def _tokenizer() -> TextTokenizer:
    base = demo.build_tokenizer()
    tok = Tokenizer.from_str(base.tokenizer.to_str())
    tok.add_special_tokens(MARKERS)
    return TextTokenizer(tok, demo.CHAT_TEMPLATE, bos_token=demo.BOS, eos_tokens=[demo.EOT])


TOK = _tokenizer()


def run_tokens(parser: ToolParser | None, output: str) -> tuple[ParsedOutput, list[str]]:
    """``output`` as the engine would stream it: token ids (specials included), each decoded
    as it comes, each delta fed to the parser."""
    ids = TOK.encode(output, allow_special=True)
    decoder = IncrementalDecoder(TOK)
    stream = ToolStream(parser)
    deltas: list[str | ToolCallDelta] = []
    texts = []
    for i in ids:
        piece = decoder.push(i)
        texts.append(piece)
        deltas += stream.feed(piece)
    tail = decoder.flush()
    deltas += stream.feed(tail) + stream.finish()
    content = "".join(d for d in deltas if isinstance(d, str))
    calls = [d.call for d in deltas if isinstance(d, ToolCallDelta)]
    assert [d.index for d in deltas if isinstance(d, ToolCallDelta)] == list(range(len(calls)))
    return ParsedOutput(content, calls), texts


def summary(p: ParsedOutput) -> tuple[str, list[tuple[str, dict]]]:
    return p.content, [(c.name, json.loads(c.arguments)) for c in p.calls]


def check(parser: ToolParser, output: str, content: str, calls: list[tuple[str, dict]]) -> None:
    streamed, texts = run_tokens(parser, output)
    whole = parse_all(parser, "".join(texts))  # what a non-streamed answer is made of
    assert summary(streamed) == summary(whole) == (content, calls)
    assert all(c.id.startswith("call_") and len(c.id) > 20 for c in streamed.calls)


CASES = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
         "", [("get_weather", {"city": "Paris"})]),
        ('Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
         '<tool_call>\n{"name": "b", "arguments": {"y": [1, {"z": "é"}]}}\n</tool_call>',
         "Let me look.", [("a", {"x": 1}), ("b", {"y": [1, {"z": "é"}]})]),
        # arguments as a JSON string (some fine-tunes write them so)
        ('<tool_call>{"name": "a", "arguments": "{\\"x\\": 2}"}</tool_call>', "",
         [("a", {"x": 2})]),
        # malformed JSON inside the tags: text
        ('<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call> ok',
         '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call> ok', []),
        # no name: text
        ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
         []),
        # cut off mid-call (max_tokens): text
        ('Sure <tool_call>\n{"name": "get_weather", "argum',
         'Sure <tool_call>\n{"name": "get_weather", "argum', []),
        # a lone marker at the end, and a prefix of one
        ("text <tool_call>", "text <tool_call>", []),
        ("text <tool_ca", "text <tool_ca", []),
        # an unclosed call whose JSON is whole: a call (a model that stopped at EOS)
        ('<tool_call>\n{"name": "a", "arguments": {}}\n', "", [("a", {})]),
        ("no calls at all, just < and <tool and </tool_call>",
         "no calls at all, just < and <tool and </tool_call>", []),
    ],
    "llama3": [
        ('{"name": "get_weather", "parameters": {"city": "Paris"}}', "",
         [("get_weather", {"city": "Paris"})]),
        ('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
         "", [("a", {"x": 1}), ("b", {})]),
        ('  {"name": "a", "arguments": {"x": 1}}', "", [("a", {"x": 1})]),
        ('{"name": "a", "parameters": {"x": 1', '{"name": "a", "parameters": {"x": 1', []),
        ('{"not": "a call"}', '{"not": "a call"}', []),
        ("The answer is {x}.", "The answer is {x}.", []),
        ('{"name": "a", "parameters": {}} and then text', "and then text", [("a", {})]),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "",
         [("get_weather", {"city": "Paris"})]),
        ('[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]',
         "", [("a", {"x": 1}), ("b", {})]),
        ('[{"name": "a", "arguments": {}}]', "", [("a", {})]),
        ('[TOOL_CALLS][{"name": "a", "arguments": {"x"', '[{"name": "a", "arguments": {"x"',
         []),  # the special marker is not text: the decode dropped it
        ("[1, 2, 3] are numbers", "[1, 2, 3] are numbers", []),
        ('[{"name": "a", "arguments": {}}, {"bad": 1}]', '[{"name": "a", "arguments": {}}, '
         '{"bad": 1}]', []),
    ],
}


@pytest.mark.parametrize(("family", "case"), [(f, c) for f, cs in CASES.items() for c in cs])
def test_family_through_tokenizer(family: str, case: tuple[str, str, list]) -> None:
    output, content, calls = case
    check(parser_for(None, family), output, content, calls)  # type: ignore[arg-type]


def test_no_parser_is_plain_text() -> None:
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
    assert summary(run_tokens(None, text)[0]) == (text, [])
    assert parser_for("anything", "none") is None


def test_parser_chosen_from_template() -> None:
    assert isinstance(parser_for(demo.CHAT_TEMPLATE), HermesParser)
    assert isinstance(parser_for("{{ '[TOOL_CALLS]' }}{{ tool_call.arguments }}"), MistralParser)
    assert isinstance(parser_for("<|python_tag|>{{ m }}ipython"), Llama3Parser)
    assert isinstance(parser_for(None), HermesParser)
    assert isinstance(parser_for(demo.CHAT_TEMPLATE, "llama3"), Llama3Parser)
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        parser_for(None, "qwen-ish")


def test_content_before_a_call_is_sent_before_the_call_is_decided() -> None:
    """Text that cannot start a call goes out at once; text that may is held (and so is
    trailing whitespace, dropped when only calls follow)."""
    stream = ToolStream(HermesParser())
    assert stream.feed("Hello <tool") == ["Hello"]
    assert stream.feed("_c") == []
    out = stream.feed('all>{"name": "f", "arguments": {}}</tool_call>')
    assert [type(d) for d in out] == [ToolCallDelta]
    assert stream.finish() == []


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=12),
       family=st.sampled_from(sorted(CASES)), which=st.integers(0, 20))
def test_any_split_gives_the_whole_answer(cuts: list[int], family: str, which: int) -> None:
    """However the text arrives in pieces, the stream says what the whole text says."""
    output = CASES[family][which % len(CASES[family])][0]
    text = "".join(run_tokens(None, output)[1])  # as decoded (special markers dropped)
    parser = parser_for(None, family)
    stream = ToolStream(parser)
    deltas: list[str | ToolCallDelta] = []
    last = 0
    for cut in [*sorted({min(c, len(text)) for c in cuts}), len(text)]:
        deltas += stream.feed(text[last:cut])
        last = cut
    deltas += stream.finish()
    got = ParsedOutput("".join(d for d in deltas if isinstance(d, str)),
                       [d.call for d in deltas if isinstance(d, ToolCallDelta)])
    assert summary(got) == summary(parse_all(parser, text))
