"""Sampling choices, seeds, stop strings, stop ids and incremental detokenization."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvgate.gateway.engine import GenerateRequest, SamplingParams, TokenEvent
from kvgate.gateway.engine.demo import build_tokenizer
from kvgate.gateway.engine.sequence import Sequence, append_token
from kvgate.gateway.engine.tokenizer import IncrementalDecoder, TextStream

from .conftest import collect, greedy, pick, picks, prompt_of


def test_greedy_and_top_k_1_take_the_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert pick(logits, SamplingParams(temperature=0)) == 1
    assert pick(logits, SamplingParams(temperature=5.0, top_k=1)) == 1


def test_top_k_and_top_p_never_pick_outside_the_kept_set():
    logits = torch.tensor([5.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    assert picks(logits, SamplingParams(temperature=1.0, top_k=2), 200) == {0, 1}
    # p(0) ≈ 0.72: top_p=0.5 keeps token 0 alone, top_p=0.9 keeps 0 and 1
    assert picks(logits, SamplingParams(top_p=0.5), 100) == {0}
    assert picks(logits, SamplingParams(top_p=0.9), 300) == {0, 1}


def test_tiny_temperature_and_zero_top_p_are_argmax_not_nan():
    # Found by the schema fuzzer: logits / 6e-5 overflowed and softmax gave NaN.
    logits = torch.tensor([1e4, 3e4, -2e4, 2.9e4])
    for temperature in (6e-5, 1e-6, 1e-30):
        assert picks(logits, SamplingParams(temperature=temperature), 5) == {1}
    assert picks(logits, SamplingParams(top_p=0), 5) == {1}
    assert picks(logits, SamplingParams(top_p=2.2e-313), 5) == {1}  # fuzzer: 0 in fp32
    # large logits at an ordinary temperature: shifted, so still a valid distribution
    assert picks(logits, SamplingParams(temperature=2e3), 50) <= {1, 3}


def test_invalid_params_are_refused():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=-0.1), dict(top_p=1.5),
                dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


async def test_seeded_sampling_is_reproducible_alone_or_batched(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "roll the dice")

    def req(rid: str, seed: int) -> GenerateRequest:
        return GenerateRequest(rid, "tenant:a", prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True))

    alone, _, _ = await collect(engine, req("a", 7))
    together = await asyncio.gather(
        collect(engine, req("b", 7)), collect(engine, req("c", 8)), collect(engine, req("d", 7))
    )
    assert together[0][0] == alone
    assert together[2][0] == alone
    assert together[1][0] != alone


async def test_stop_string_ends_output_before_it(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "say something")
    ids, text, _ = await collect(engine, GenerateRequest("a", "tenant:a", prompt, greedy(30)))
    full = engine.tokenizer.decode(ids)
    assert text == full
    stop = full[10:13]
    start = full.index(stop)
    _, text2, fin = await collect(engine, GenerateRequest("b", "tenant:a", prompt, greedy(30, stop=["never", stop])))
    assert fin.finish_reason == "stop"
    assert fin.stop_sequence == stop  # which one ended it
    assert text2 == full[:start]
    _, _, fin = await collect(engine, GenerateRequest("c", "tenant:a", prompt, greedy(5, stop=["never"])))
    assert (fin.finish_reason, fin.stop_sequence) == ("length", None)


async def test_stop_token_id_ends_output(make_engine):
    engine = await make_engine()
    prompt = prompt_of(engine, "count")
    ids, _, _ = await collect(engine, GenerateRequest("a", "tenant:a", prompt, greedy(20)))
    stop_id = ids[5]
    first = ids.index(stop_id)
    ids2, _, fin = await collect(engine, GenerateRequest("b", "tenant:a", prompt, greedy(20, stop_token_ids=[stop_id])))
    assert fin.finish_reason == "stop"
    assert fin.stop_sequence is None  # a stop id, not a stop string
    assert ids2 == ids[: first + 1]
    assert fin.usage.completion_tokens == first + 1


def test_eos_stops_unless_ignored():
    tok = build_tokenizer()
    eot = tok.eos_token_ids[0]
    for ignore, expect in ((False, "stop"), (True, None)):
        for stop in ([], ["zz"]):  # text made where it is read / by the engine
            params = SamplingParams(max_tokens=5, ignore_eos=ignore, stop=stop)
            seq = Sequence(GenerateRequest("r", "ns", [1, 2], params), tok)
            append_token(seq, 65, tok.eos_token_ids, 100)
            _, reason = append_token(seq, eot, tok.eos_token_ids, 100)
            assert reason == expect
            assert seq.usage().completion_tokens == 2
            if stop:
                assert seq.decoder.text == "A"  # eos is never text
        if not ignore:
            text = TextStream(tok, SamplingParams(max_tokens=5))
            assert text.text(TokenEvent("", [65, eot], final=True)) == "A"


def _events(tok, params: SamplingParams, ids: list[int], split: int) -> tuple[str, str, str | None]:
    """The text of ``ids`` sent through the engine's ``append_token`` and, as token events
    of ``split`` ids each, through the reader's ``TextStream``: (engine's, reader's, reason)."""
    seq = Sequence(GenerateRequest("r", "ns", [1], params), tok)
    sent, reason, taken = "", None, []
    for t in ids:
        delta, reason = append_token(seq, t, tok.eos_token_ids, 10_000)
        sent += delta
        taken.append(t)
        if reason is not None:
            break
    stream = TextStream(tok, params)
    read = "".join(stream.text(TokenEvent("", taken[i : i + split],
                                          final=reason is not None and i + split >= len(taken)))
                   for i in range(0, len(taken), split))
    return sent, read, reason


@pytest.mark.parametrize("seed", range(6))
def test_text_made_where_it_is_read_is_the_engines_own(seed):
    """A request whose end its text does not decide is sent as ids and detokenized by its
    reader (``TextStream``): the text, split over events any way, is what the engine's own
    detokenizing makes of the same ids (multi-byte characters cut across tokens, an end
    token, the token limit with a character left incomplete)."""
    tok = build_tokenizer()
    g = torch.Generator().manual_seed(seed)
    # the demo's ids are bytes (and a few specials): random ones cut characters anywhere
    raw = torch.randint(0, tok.vocab_size, (40,), generator=g).tolist()
    eot = tok.eos_token_ids[0]
    for ids, params in (
            (raw, SamplingParams(max_tokens=40)),
            ([*raw[:10], eot, *raw[10:]], SamplingParams(max_tokens=40)),
            ([*raw[:10], eot, *raw[10:]], SamplingParams(max_tokens=40, ignore_eos=True)),
            (raw, SamplingParams(max_tokens=7)),
            (raw, SamplingParams(max_tokens=40, stop_token_ids=[raw[5]]))):
        for split in (1, 3, 64):
            # a stop string that never matches: the engine detokenizes (``reads_text``)
            engine_text, _, engine_reason = _events(
                tok, SamplingParams(**{**params.__dict__, "stop": ["\x00\x01"]}), ids, split)
            sent, read, reason = _events(tok, params, ids, split)
            assert sent == "" and reason == engine_reason
            assert read == engine_text


def test_stop_string_spanning_tokens_is_held_back_and_cut():
    tok = build_tokenizer()
    seq = Sequence(GenerateRequest("r", "ns", [1], SamplingParams(max_tokens=50, stop=["END"])), tok)
    sent = ""
    for ch in "abcEN":
        delta, reason = append_token(seq, ord(ch), tok.eos_token_ids, 100)
        sent += delta
        assert reason is None
    assert sent == "abc"  # "EN" could start the stop string
    delta, reason = append_token(seq, ord("D"), tok.eos_token_ids, 100)
    assert reason == "stop" and sent + delta == "abc"
    assert seq.stop_sequence == "END"


@pytest.mark.parametrize(("stops", "hit"), [
    (["ND", "xyz", "END"], "END"),  # the earliest start wins, wherever it is listed
    (["EN", "END"], "EN"),  # the shorter one completes first
    (["cEND", "END"], "cEND"),
])
def test_the_stop_string_that_ended_the_output_is_named(stops, hit):
    tok = build_tokenizer()
    seq = Sequence(GenerateRequest("r", "ns", [1], SamplingParams(max_tokens=50, stop=stops)), tok)
    for ch in "abcEND":
        _, reason = append_token(seq, ord(ch), tok.eos_token_ids, 100)
        if reason is not None:
            break
    assert reason == "stop" and seq.stop_sequence == hit
    assert seq.decoder.text == "abcEND"[: "abcEND".index(hit)]


def _write(seq: Sequence, text: str, eos: list[int]) -> tuple[str, str | None]:
    sent, reason = "", None
    for ch in text:
        delta, reason = append_token(seq, ord(ch), eos, 1000)
        sent += delta
        if reason is not None:
            break
    return sent, reason


def test_a_call_repeated_word_for_word_ends_the_output_where_it_begins():
    """The guard against a small model writing the same tool call until max_tokens: an
    open call is held back (never sent half), a repeat of an earlier call is never sent."""
    tok = build_tokenizer()
    params = SamplingParams(max_tokens=500, repeat_block=("<c>", "</c>"))
    seq = Sequence(GenerateRequest("r", "ns", [1], params), tok)
    sent, reason = _write(seq, "hi <c>a(1)</c>\n<c>a(2)", tok.eos_token_ids)
    assert reason is None and sent == "hi <c>a(1)</c>\n"  # the second call is still open
    more, reason = _write(seq, "</c>\n<c>a(1)</c>\n<c>a(3)</c>", tok.eos_token_ids)
    assert reason == "stop"
    assert sent + more == "hi <c>a(1)</c>\n<c>a(2)</c>\n" == seq.decoder.text
    # a tail that may begin a call waits too; without the markers nothing changes
    seq = Sequence(GenerateRequest("r", "ns", [1], params), tok)
    assert _write(seq, "ok <", tok.eos_token_ids) == ("ok ", None)
    plain = SamplingParams(max_tokens=500)
    assert _events(tok, plain, [ord(ch) for ch in "<c>a</c><c>a</c>"], 1)[1:] == (
        "<c>a</c><c>a</c>", None)


def test_a_marker_inside_a_call_is_its_text_not_a_new_call():
    """Blocks are read as the parser reads them: an opening marker inside a call's
    arguments neither starts a block of its own nor makes two different calls one."""
    tok = build_tokenizer()
    params = SamplingParams(max_tokens=500, repeat_block=("<c>", "</c>"))
    seq = Sequence(GenerateRequest("r", "ns", [1], params), tok)
    text = "<c>a<c></c>\n<c>b<c></c>\n"
    assert _write(seq, text, tok.eos_token_ids) == (text, None)
    more, reason = _write(seq, "<c>b<c></c>", tok.eos_token_ids)  # now a real repeat
    assert (more, reason) == ("", "stop") and seq.decoder.text == text


@pytest.mark.parametrize(("text", "sent", "reason"), [
    ("<c>x</c><c>x</c>", "<c>x</c>", "stop"),  # the repeat closes on the last token
    ("<c>x</c>\n<c>x", "<c>x</c>\n", "stop"),  # cut while repeating: the repeat is dropped
    ("<c>x</c>\n<c>y", "<c>x</c>\n", "length"),  # cut in a new call: dropped, not text
    ("<c>x</c> ok <", "<c>x</c> ok ", "length"),  # a tail that may begin a call: dropped
    ("plain text", "plain text", "length"),
])
def test_a_call_the_token_limit_cuts_is_never_sent_as_text(text, sent, reason):
    tok = build_tokenizer()
    params = SamplingParams(max_tokens=len(text), repeat_block=("<c>", "</c>"))
    seq = Sequence(GenerateRequest("r", "ns", [1], params), tok)
    assert _write(seq, text, tok.eos_token_ids) == (sent, reason)
    assert seq.decoder.text == sent


def test_an_eos_or_the_length_names_no_stop_string():
    tok = build_tokenizer()
    for token, max_tokens, reason in ((tok.eos_token_ids[0], 5, "stop"), (65, 1, "length")):
        seq = Sequence(GenerateRequest("r", "ns", [1], SamplingParams(max_tokens=max_tokens,
                                                                      stop=["A<"])), tok)
        assert append_token(seq, token, tok.eos_token_ids, 100)[1] == reason
        assert seq.stop_sequence is None


def test_incremental_decoder_never_splits_a_character():
    tok = build_tokenizer()
    dec = IncrementalDecoder(tok)
    deltas = [dec.push(b) for b in "é€x".encode()]
    assert "".join(deltas) == "é€x"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[0] == ""  # first byte of é alone is not text yet


async def test_a_request_that_does_not_stream_gets_one_token_event(make_engine):
    """stream=False: the same tokens and text as streaming, delivered as one event (one
    wake-up of the asyncio side instead of one per token), first-token usage included."""
    engine = await make_engine()
    prompt = prompt_of(engine, "say it all at once")
    streamed = GenerateRequest("s", "tenant:a", prompt, greedy(10))
    whole = GenerateRequest("w", "tenant:a", prompt, greedy(10), stream=False)
    ids, text, finish = await collect(engine, streamed)
    events = [ev async for ev in engine.generate(whole)]
    assert len(events) == 2
    assert events[0].token_ids == ids and events[0].text == text
    assert events[0].prompt_usage is not None
    assert events[1].usage.completion_tokens == finish.usage.completion_tokens == 10
