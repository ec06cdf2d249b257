"""The OpenAI (and vLLM extra) sampling fields of chat and completions requests → ``SamplingParams``,
and the ``logprobs`` objects of their answers.

Fields that would change the output and that we do not implement are refused with a 400
that names them (``UNIMPLEMENTED``); none is dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from kvgate.gateway.engine import SamplingParams
from kvgate.gateway.engine.sampling import MAX_LOGPROBS, TokenLogprob
from kvgate.gateway.protocol.body import INT64_MAX, INT64_MIN, field, integer, number, stop_list
from kvgate.gateway.protocol.errors import bad_request

if TYPE_CHECKING:
    from kvgate.gateway.engine.tokenizer import TextTokenizer

MAX_N = 16  # choices per request (each one decodes; n is a multiplier on the work)

# vLLM's extra fields that change the output and are not implemented here (its
# ``guided_json|regex|choice|grammar`` are structured outputs: structured_outputs.py).
UNIMPLEMENTED = {
    "best_of": "only best_of 1 (or equal to n) is supported",
    "use_beam_search": "beam search is not implemented",
    "length_penalty": "beam search is not implemented",
    "early_stopping": "beam search is not implemented",
    "min_tokens": "a minimum output length is not implemented",
    "bad_words": "bad_words is not implemented; use logit_bias with -100",
    "allowed_token_ids": "allowed_token_ids is not implemented; use logit_bias",
    "prompt_logprobs": "prompt log probabilities are not returned",
    "truncate_prompt_tokens": "prompt truncation is not implemented",
    "skip_special_tokens": "special tokens are always skipped in the text",
    "spaces_between_special_tokens": "special tokens are always skipped in the text",
    "include_stop_str_in_output": "the stop string is never included in the output",
    "guided_decoding_backend": "guided decoding options are not exposed",
    "guided_whitespace_pattern": "guided decoding options are not exposed",
    "structured_outputs": "use response_format",
    "logits_processors": "custom logits processors are not supported",
    "suffix": "insertion (suffix) is not implemented",
}


def reject_unimplemented(body: dict[str, Any], handled: frozenset[str] = frozenset()) -> None:
    """A 400 naming the first field of ``UNIMPLEMENTED`` the body sets (to anything but its
    neutral value); ``handled`` names fields another part of the server maps."""
    for name, why in UNIMPLEMENTED.items():
        if name in handled or name not in body:
            continue
        value = body[name]
        if value is None or value is False or value in ([], {}, ""):
            continue
        if name == "best_of" and isinstance(value, int) and value in (1, body.get("n") or 1):
            continue
        if name in ("skip_special_tokens",) and value is True:
            continue
        if name == "min_tokens" and value == 0:
            continue
        raise bad_request(f"'{name}' is not supported by this server: {why}.", param=name,
                          code="unsupported_parameter")


def _logit_bias(body: dict[str, Any], vocab_size: int) -> dict[int, float]:
    raw = field(body, "logit_bias", dict, default={})
    bias: dict[int, float] = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token < vocab_size or str(token) != key.strip():
            raise bad_request(f"'logit_bias' key {key[:40]!r} is not a token id of this model "
                              f"(0 to {vocab_size - 1}).", param="logit_bias",
                              code="invalid_value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -100 <= value <= 100:
            raise bad_request(f"'logit_bias' value for token {token} must be a number from "
                              "-100 to 100.", param="logit_bias", code="invalid_value")
        bias[token] = float(value)
    return bias


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """Chat: ``logprobs: bool`` + ``top_logprobs: 0..20``; completions: ``logprobs: 0..5``
    (vLLM allows up to 20; so do we)."""
    if not chat:
        return integer(body, "logprobs", 0, MAX_LOGPROBS, None)
    wanted = field(body, "logprobs", bool, default=False)
    top = integer(body, "top_logprobs", 0, MAX_LOGPROBS, None)
    if top is not None and not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true.", param="top_logprobs",
                          code="invalid_value")
    return (top or 0) if wanted else None


def model_defaults(model_info: Mapping[str, Any]) -> Mapping[str, float]:
    """The served model's own sampling defaults (its generation_config.json)."""
    defaults = model_info.get("sampling_defaults")
    return defaults if isinstance(defaults, Mapping) else {}


def default_temperature(body: dict[str, Any], defaults: Mapping[str, float]) -> float:
    """The temperature a body that names none gets: the model's default, except that a
    greedy default gives way to 1.0 when the body asks for ``top_p`` or ``top_k`` (it
    asks to sample)."""
    value = float(defaults.get("temperature", 1.0))
    if value == 0.0 and ("top_p" in body or "top_k" in body):
        return 1.0
    return value


def sampling_from(body: dict[str, Any], max_tokens: int, *, chat: bool,
                  vocab_size: int, defaults: Mapping[str, float]) -> SamplingParams:
    """Every sampling field of a chat or completions body, validated (400 naming it).
    ``defaults``: the model's own temperature/top_p/top_k for fields the body omits."""
    reject_unimplemented(body)
    top_k = integer(body, "top_k", -1, INT64_MAX, None)
    if top_k is None and "top_k" in defaults:
        top_k = int(defaults["top_k"])
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=number(body, "temperature", 0.0, 2.0, default_temperature(body, defaults)),
        top_p=number(body, "top_p", 0.0, 1.0, defaults.get("top_p", 1.0)),
        top_k=0 if top_k is None or top_k == -1 else top_k,  # vLLM: -1 (or 0) = off
        min_p=number(body, "min_p", 0.0, 1.0, 0.0),
        seed=integer(body, "seed", INT64_MIN, INT64_MAX, None),  # choice i: seed + i
        stop=stop_list(body, "stop"),
        stop_token_ids=_stop_ids(body, vocab_size),
        ignore_eos=field(body, "ignore_eos", bool, default=False),  # vLLM's extra
        presence_penalty=number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        repetition_penalty=_repetition(body),
        logit_bias=_logit_bias(body, vocab_size),
        logprobs=_logprobs(body, chat),
        n=choices_of(body),
    )


def _stop_ids(body: dict[str, Any], vocab_size: int) -> list[int]:
    """vLLM's ``stop_token_ids``: generation ends after any of them (it is counted, not sent)."""
    ids = field(body, "stop_token_ids", list, default=[])
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
               for t in ids):
        raise bad_request(f"'stop_token_ids' must be token ids (0 to {vocab_size - 1}).",
                          param="stop_token_ids", code="invalid_value")
    return list(ids)


def _repetition(body: dict[str, Any]) -> float:
    # 1 is off; above 1 discourages repeats. Bounded so a divided logit stays finite.
    return number(body, "repetition_penalty", 0.01, 100.0, 1.0)


def choices_of(body: dict[str, Any]) -> int:
    n = integer(body, "n", 1, MAX_N, 1)
    assert n is not None
    return n


# -- logprobs in the answers --------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE token uses for
    each byte → the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def token_bytes(tokenizer: TextTokenizer, token_id: int) -> bytes:
    """The bytes of one token (a byte-level token's own bytes, even half a character)."""
    piece = tokenizer.tokenizer.id_to_token(token_id)
    table = _byte_decoder()
    if piece is not None and piece and all(c in table for c in piece) \
            and token_id not in tokenizer.special_ids:
        return bytes(table[c] for c in piece)
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _token(tokenizer: TextTokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = token_bytes(tokenizer, token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer: TextTokenizer, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or of one streamed chunk)."""
    content = []
    for lp in logprobs:
        text, raw = _token(tokenizer, lp.token_id)
        top = []
        for tid, value in lp.top:
            t, b = _token(tokenizer, tid)
            top.append({"token": t, "logprob": value, "bytes": b})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw,
                        "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: TextTokenizer, logprobs: list[TokenLogprob],
                        offset: int) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion; ``offset``: where the first token's text
    starts in the choice's text (after an echoed prompt, or earlier chunks)."""
    tokens: list[str] = []
    offsets: list[int] = []
    top: list[dict[str, float]] = []
    for lp in logprobs:
        text = _token(tokenizer, lp.token_id)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        alternatives: dict[str, float] = {}
        for tid, value in lp.top:
            alternatives.setdefault(_token(tokenizer, tid)[0], value)
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": top, "text_offset": offsets}
