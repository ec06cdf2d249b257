"""Tools on a chat template that knows none (SmolLM2's, and many small models'): kvgate
writes the tools, the calls and their results in the Hermes form, which the Hermes parser
reads back; templates that render tools themselves are left alone."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from kvgate.gateway.engine import demo
from kvgate.gateway.engine.tokenizer import TextTokenizer, hermes_tool_turns
from kvgate.gateway.protocol.tool_parsers import parse_all, parser_for

# SmolLM2-135M-Instruct's template (ChatML, a default system turn, no tools).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
LOOP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo and Lima?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather",
                                                     "arguments": '{"city": "Oslo"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather",
                                                     "arguments": {"city": "Lima"}}}]},
    {"role": "tool", "tool_call_id": "a", "content": "-3 C"},
    {"role": "tool", "tool_call_id": "b", "content": "19 C"},
]


def smollm2() -> TextTokenizer:
    tok = Tokenizer.from_str(demo.build_tokenizer().tokenizer.to_str())
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return TextTokenizer(tok, SMOLLM2, eos_tokens=["<|im_end|>"])


def test_a_template_without_tools_gets_them_in_the_hermes_form() -> None:
    t = smollm2()
    assert not t.template_reads_tools and not t.template_reads_tool_turns
    text = t.render_chat(LOOP, tools=TOOLS)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools")
    assert f"<tools>\n{json.dumps(TOOLS[0], ensure_ascii=False)}\n</tools>" in system
    assert system.endswith("Be brief.")  # the client's system text follows the tools
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Oslo"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
            '"arguments": {"city": "Lima"}}\n</tool_call><|im_end|>') in text
    assert ("<|im_start|>user\n<tool_response>\n-3 C\n</tool_response>\n<tool_response>\n"
            "19 C\n</tool_response><|im_end|>") in text  # both results, one user turn
    assert text.endswith("<|im_start|>assistant\n")


def test_what_the_model_writes_in_that_form_parses_back_as_calls() -> None:
    parser = parser_for(SMOLLM2)
    assert parser is not None and parser.name == "hermes"
    out = parse_all(parser, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                       "\n</tool_call>")
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [
        ("get_weather", {"city": "Oslo"})]


def test_no_tools_and_no_tool_turns_render_as_before() -> None:
    plain = [{"role": "user", "content": "hi"}]
    assert smollm2().render_chat(plain) == smollm2()._template.render(  # type: ignore[union-attr]
        messages=plain, tools=None, add_generation_prompt=True, bos_token="", eos_token="<|im_end|>")


def test_a_template_that_renders_tools_itself_is_left_alone() -> None:
    t = demo.build_tokenizer()
    assert t.template_reads_tools
    text = t.render_chat(LOOP, tools=TOOLS)
    assert text.count("# Tools") == 1 and "<|tool|><tool_response>" in text


def test_only_the_tools_block_when_the_template_renders_tool_turns() -> None:
    turns = hermes_tool_turns(LOOP, TOOLS, turns=False)
    assert turns[0]["content"].startswith("# Tools") and turns[0]["content"].endswith("Be brief.")
    assert turns[1:] == LOOP[1:]
