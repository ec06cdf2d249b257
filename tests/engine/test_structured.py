"""Structured outputs in the engine: generated JSON schemas on the demo model (random
weights: only the grammar makes its output valid), masks that the sampler never crosses,
and unconstrained sequences in the same batch left exactly as they were."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import jsonschema
import pytest

from kvgate.gateway.engine import (
    GenerateRequest,
    InvalidGrammar,
    SamplingParams,
    StructuredSpec,
    json_schema_spec,
)
from kvgate.gateway.engine.engine import Engine
from kvgate.gateway.engine.structured import JSON_OBJECT
from tests.engine.conftest import collect, greedy, prompt_of

# ("time" is left out: jsonschema's checker refuses RFC 3339 offsets such as -12:44)
FORMATS = ["date", "date-time", "uuid", "ipv4"]


def leaf(rng: random.Random) -> dict[str, Any]:
    # No unbounded "number": a random-weight model may never end its fraction digits (a
    # real model does); strings and integers are bounded for the same reason.
    kind = rng.choice(["string", "string", "enum", "integer", "number", "boolean", "null",
                       "format", "pattern"])
    if kind == "string":
        lo = rng.randint(0, 2)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(1, 6)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2, True, None, "x y"],
                                   rng.randint(1, 4))}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "enum": [0.5, 1.25, -3.0, 1e3][: rng.randint(1, 4)]}
    if kind == "format":
        return {"type": "string", "format": rng.choice(FORMATS)}
    if kind == "pattern":
        return {"type": "string", "pattern": "^[a-z]{1,4}-[0-9]{2}$"}
    return {"type": kind}


def schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object schema: nested objects, arrays with bounds, required subsets."""
    props: dict[str, Any] = {}
    for i in range(rng.randint(1, 4)):
        roll = rng.random()
        if roll < 0.2 and depth < 2:
            props[f"obj{i}"] = schema(rng, depth + 1)
        elif roll < 0.4 and depth < 2:
            lo = rng.randint(0, 2)
            items = schema(rng, depth + 1) if rng.random() < 0.3 else leaf(rng)
            props[f"arr{i}"] = {"type": "array", "items": items, "minItems": lo,
                                "maxItems": lo + rng.randint(0, 2)}
        else:
            props[f"f{i}"] = leaf(rng)
    required = [k for k in props if rng.random() < 0.6]
    return {"type": "object", "properties": props, "required": required,
            "additionalProperties": False}


SCHEMAS = [schema(random.Random(i)) for i in range(200)]


@pytest.fixture
async def engine(make_engine: Any) -> Engine:
    e: Engine = await make_engine(max_running=64, max_batch_tokens=2048, max_queue=512,
                                  device_cache_bytes=64 << 20)
    return e


async def test_two_hundred_generated_schemas_give_valid_json(engine: Engine) -> None:
    prompt = prompt_of(engine, "Answer in JSON.")

    async def one(i: int, s: dict[str, Any]) -> tuple[str, str]:
        params = SamplingParams(max_tokens=600, temperature=0.0,
                                structured=json_schema_spec(s, strict=False))
        _, text, finish = await collect(engine, GenerateRequest(f"s{i}", "ns", prompt, params))
        return text, finish.finish_reason

    results = await asyncio.gather(*(one(i, s) for i, s in enumerate(SCHEMAS)))
    checker = jsonschema.FormatChecker()
    for s, (text, reason) in zip(SCHEMAS, results, strict=True):
        assert reason == "stop", (s, text)
        jsonschema.validate(json.loads(text), s, format_checker=checker)


async def test_masked_tokens_are_never_sampled_and_free_rows_are_untouched(
        engine: Engine) -> None:
    prompt = prompt_of(engine, "hello")
    free_alone = await collect(engine, GenerateRequest("alone", "ns", prompt, greedy(24)))
    spec = StructuredSpec("regex", "(ab|cd)+x")
    seen: list[list[int]] = []

    real_apply = engine.grammars.apply

    def spy(computed: list[Any]) -> None:  # records each grammar row's allowed set
        real_apply(computed)
        for chunk, row in computed:
            if row is not None and chunk.seq.grammar is not None:
                seen.append([int(t) for t in (row > float("-inf")).nonzero().flatten()])

    engine.grammars.apply = spy  # type: ignore[method-assign]
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=7, structured=spec)
    results = await asyncio.gather(
        collect(engine, GenerateRequest("g1", "ns", prompt, sampled)),
        collect(engine, GenerateRequest("free", "ns2", prompt, greedy(24))),
        collect(engine, GenerateRequest("g2", "ns", prompt, SamplingParams(
            max_tokens=40, temperature=0.0, structured=spec))),
    )
    engine.grammars.apply = real_apply  # type: ignore[method-assign]
    tok = engine.tokenizer
    allowed = {tok.encode(c)[0] for c in "abcdx"}
    assert seen and all(set(s) <= allowed for s in seen)
    for ids, text, finish in (results[0], results[2]):
        assert set(ids) <= allowed
        import re

        assert finish.finish_reason in ("stop", "length")
        if finish.finish_reason == "stop":
            assert re.fullmatch("(ab|cd)+x", text), text
    assert results[1][0] == free_alone[0]  # the unconstrained sequence: same greedy tokens


async def test_grammar_completion_stops_and_bills(engine: Engine) -> None:
    prompt = prompt_of(engine, "pick")
    spec = StructuredSpec("lark", 'start: "yes" | "no"')
    ids, text, finish = await collect(engine, GenerateRequest(
        "c", "ns", prompt, SamplingParams(max_tokens=50, temperature=0.0, structured=spec)))
    assert text in ("yes", "no") and finish.finish_reason == "stop"
    assert finish.usage.completion_tokens == len(ids) == len(text)  # byte tokens, no EOS


async def test_json_object_and_embedded_schema_in_lark(engine: Engine) -> None:
    prompt = prompt_of(engine, "call")
    lark = ('start: "<tool_call>" obj "</tool_call>"\n'
            'obj: %json {"type": "object", "properties": {"name": {"const": "get"}, '
            '"arguments": {"type": "object", "properties": {"n": {"type": "integer", '
            '"minimum": 0, "maximum": 9}}, "required": ["n"], "additionalProperties": false}},'
            ' "required": ["name", "arguments"], "additionalProperties": false,'
            ' "x-guidance": {"whitespace_flexible": false}}')
    _, text, finish = await collect(engine, GenerateRequest(
        "l", "ns", prompt, SamplingParams(max_tokens=200, temperature=0.0,
                                          structured=StructuredSpec("lark", lark))))
    assert finish.finish_reason == "stop"
    assert text.startswith("<tool_call>") and text.endswith("</tool_call>")
    call = json.loads(text[len("<tool_call>"):-len("</tool_call>")])
    assert call["name"] == "get" and 0 <= call["arguments"]["n"] <= 9
    engine.grammars.compile(JSON_OBJECT)


@pytest.mark.parametrize("spec", [
    StructuredSpec("json_schema", '{"type": "objectx"}'),
    StructuredSpec("json_schema", "not json"),
    StructuredSpec("regex", "[a-"),
    StructuredSpec("lark", "start: undefined_rule"),
])
async def test_invalid_specs_raise_invalid_grammar(engine: Engine, spec: StructuredSpec) -> None:
    request = GenerateRequest("bad", "ns", prompt_of(engine, "x"),
                              SamplingParams(max_tokens=4, structured=spec))
    with pytest.raises(InvalidGrammar):
        engine.check(request)


def _ref_chain(n: int) -> str:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}}
            for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return json.dumps({"$ref": "#/$defs/d0", "$defs": defs})


@pytest.mark.parametrize("spec, bound", [
    # Past these the grammar engine's compiler crashed the whole process (a segfault):
    # chains of 1000 "$ref"s and of 3000 Lark rules did. Refused before it sees them.
    (StructuredSpec("json_schema", _ref_chain(1000)), "characters"),
    (StructuredSpec("json_schema", _ref_chain(300)), 'ref"s; the limit'),
    (StructuredSpec("lark", "start: r0\n" + "".join(
        f'r{i}: "a" r{i + 1}\n' for i in range(600)) + 'r600: "b"\n'), "rules"),
    (StructuredSpec("regex", "(" * 100 + "a" + ")" * 100), "levels deep"),
])
async def test_specs_past_the_bounds_are_refused_before_compiling(
        engine: Engine, spec: StructuredSpec, bound: str) -> None:
    request = GenerateRequest("big", "ns", prompt_of(engine, "x"),
                              SamplingParams(max_tokens=4, structured=spec))
    with pytest.raises(InvalidGrammar, match=bound):
        engine.check(request)


async def test_a_grammar_the_engine_gives_up_on_fails_its_sequence_alone(
        engine: Engine) -> None:
    """``a: "x" a`` never ends: the grammar engine gives up after a while; that
    sequence fails with ``InvalidGrammar`` as its cause, and the engine keeps serving."""
    from kvgate.gateway.engine import SequenceFailed

    spec = StructuredSpec("lark", 'start: a\na: "x" a')
    request = GenerateRequest("endless", "ns", prompt_of(engine, "x"),
                              SamplingParams(max_tokens=2000, structured=spec))
    with pytest.raises(SequenceFailed) as failed:
        await collect(engine, request)
    assert isinstance(failed.value.__cause__, InvalidGrammar)
    assert failed.value.usage.prompt_tokens == len(request.prompt_token_ids)  # billable
    ids, _, fin = await collect(engine, GenerateRequest(
        "after", "ns", prompt_of(engine, "y"), SamplingParams(max_tokens=3, ignore_eos=True)))
    assert len(ids) == 3 and fin.finish_reason == "length"


def test_strict_schema_mapping() -> None:
    spec = json_schema_spec({"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "string"}}},
        "properties": {"type": "integer"}}}, strict=True)
    s = json.loads(spec.spec)
    assert s["additionalProperties"] is False and s["required"] == ["a", "properties"]
    assert s["properties"]["a"]["required"] == ["b"]
    assert s["properties"]["properties"] == {"type": "integer"}
    loose = json.loads(json_schema_spec({"type": "object"}, strict=False).spec)
    assert loose["x-guidance"] == {"lenient": True}
