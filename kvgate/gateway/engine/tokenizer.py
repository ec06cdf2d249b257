"""The engine's tokenizer: a ``tokenizers.Tokenizer`` plus the chat template and stop ids.

The engine never uses transformers' tokenizer classes: ``tokenizer.json`` plus a Jinja chat
template is all a Llama/Mistral/Qwen2 directory needs, and this keeps tokenizing cheap.

Text a user sent is always plain text: a special token's spelling in it (``<|im_end|>``)
encodes as ordinary text, never as the control token, so nobody can forge a role or an end
of turn. Only the chat template puts special tokens into a prompt.
"""

from __future__ import annotations

import json
import re
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.meta
import jinja2.sandbox
from tokenizers import Tokenizer

from kvgate.gateway.engine.request import PromptTooLong

if TYPE_CHECKING:
    from kvgate.gateway.engine.request import TokenEvent
    from kvgate.gateway.engine.sampling import SamplingParams


class TextTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        bos_token: str | None = None,
        eos_tokens: list[str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self._eos_tokens = list(eos_tokens or [])
        known = {t: tokenizer.token_to_id(t) for t in eos_tokens or []}
        eos = [t for t, i in known.items() if i is not None]
        self.eos_token_ids: list[int] = list(dict.fromkeys(
            i for i in known.values() if i is not None))
        self.eos_token = eos[0] if eos else None
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids: set[int] = {i for i, tok in added.items() if tok.special}
        # The same tokenizer with special tokens matched as plain text (user text).
        self._plain = Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        # Spellings of the special tokens, longest first (a regex alternation takes the first).
        self._specials = sorted({added[i].content for i in self.special_ids}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None
        self._bytes_per_token = _bytes_per_token_bound(tokenizer)
        self.max_tokens: int | None = None  # the model's context, set by the engine
        self._template = None
        self.template_reads_tools = False
        self.template_reads_tool_turns = False
        if chat_template:
            # The same environment transformers renders templates in, so model templates
            # (Llama 3, Qwen2, Mistral) that call its functions render here too.
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = _tojson
            self._template = env.from_string(chat_template)
            names = jinja2.meta.find_undeclared_variables(env.parse(chat_template))
            # Templates without a ``tools`` variable (SmolLM2's, many small models') get the
            # tools and the conversation's tool turns written in the Hermes form instead.
            self.template_reads_tools = "tools" in names
            self.template_reads_tool_turns = "tool_calls" in chat_template

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as what builds it (the engine core sends its tokenizer to the API
        servers this way), plus the context bound the engine set."""
        return (TextTokenizer, (self.tokenizer, self.chat_template, self.bos_token,
                                self._eos_tokens), {"max_tokens": self.max_tokens})

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False, allow_special: bool = False) -> list[int]:
        """``text`` → ids. A special token spelled in ``text`` is plain text unless
        ``allow_special`` (template text only): a raw completion prompt is the client's
        text, and token-id prompts are the way to send control tokens. ``add_special_tokens``
        runs the tokenizer's post-processor (e.g. a BOS)."""
        self.check_length(text)
        tok = self.tokenizer if allow_special else self._plain
        # encode_batch releases the GIL while it tokenizes (encode does not), so a big prompt
        # tokenized on a worker thread does not stop the server's event loop.
        return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def check_length(self, text: str) -> None:
        """Refuse, without tokenizing, a text that must be more tokens than the context:
        every token covers at most ``_bytes_per_token`` bytes, and a text has at least as
        many bytes as characters, so ``len(text) / _bytes_per_token`` tokens at least. A
        4 MB prompt then costs a length check, not seconds of tokenizing."""
        bound = self._bytes_per_token
        if self.max_tokens is not None and bound is not None \
                and len(text) > self.max_tokens * bound:
            raise PromptTooLong(
                f"the text is {len(text)} characters, at least {len(text) // bound} tokens; "
                f"this model's context is {self.max_tokens} tokens")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """Chat messages → prompt text; list-of-parts content is flattened to its text parts.
        ``tools`` (OpenAI function tools) reach the template as ``tools``, as transformers
        passes them; assistant ``tool_calls`` and ``tool`` messages pass through as given."""
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions with a raw prompt")
        flat = [{**m, "content": _text_of(m.get("content"))} for m in messages]
        turns = not self.template_reads_tool_turns and any(
            m.get("role") == "tool" or m.get("tool_calls") for m in flat)
        if (tools and not self.template_reads_tools) or turns:
            flat = hermes_tool_turns(flat, None if self.template_reads_tools else tools,
                                     turns=turns)
            tools = tools if self.template_reads_tools else None
        return self._template.render(
            messages=flat,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Messages (and tools) → ids: special tokens the template writes become their ids;
        the same spelling inside the messages' or tools' strings stays plain text.

        Each special token spelled in a message string is swapped for a marker no client
        can guess before rendering, so the template sees the rest of the text as it is
        (``trim`` and the like behave the same); the rendered text is then encoded with
        special tokens recognized, and each marker as its token's spelling in plain text.
        Messages without such spellings give exactly the ids of the whole rendered text.
        """
        if self._special_re is None:
            return self.encode(self.render_chat(messages, tools=tools), allow_special=True)
        nonce = secrets.token_hex(8)
        index = {t: i for i, t in enumerate(self._specials)}
        pattern = self._special_re

        def guard(value: Any) -> Any:
            if isinstance(value, str):
                return pattern.sub(lambda m: f"\ue000{nonce}.{index[m.group()]}\ue001", value)
            if isinstance(value, list):
                return [guard(v) for v in value]
            if isinstance(value, dict):  # keys too: tool schemas' property names
                return {guard(k): guard(v) for k, v in value.items()}
            return value

        text = self.render_chat([guard(m) for m in messages],
                                tools=guard(tools) if tools else None)
        self.check_length(text)
        # One compiled pattern for every request (a per-nonce pattern would be compiled per
        # call); a marker with another nonce is a client's text and stays text.
        parts = _MARKER.split(text)  # text, (nonce, index, text)*
        ids: list[int] = []
        pending = parts[0]
        for j in range(1, len(parts), 3):
            their_nonce, k, after = parts[j], parts[j + 1], parts[j + 2]
            if their_nonce != nonce:
                pending += f"\ue000{their_nonce}.{k}\ue001{after}"
                continue
            if pending:
                ids += self.encode(pending, allow_special=True)
            ids += self.encode(self._specials[int(k)])  # a spelling from a message: text
            pending = after
        if pending:
            ids += self.encode(pending, allow_special=True)
        return ids


_MARKER = re.compile("\ue000([0-9a-f]{16})\\.(\\d+)\ue001")


# Normalizers that can shrink a text by at most a factor of 4 in bytes (Unicode
# composition, one character for another); any other (e.g. one that strips) voids the bound.
_BOUNDED_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Prepend", "Replace", "Lowercase",
                        "Sequence"}


def _bytes_per_token_bound(tokenizer: Tokenizer) -> int | None:
    """At most how many bytes of (normalized-away) input one token can stand for, or None
    when no safe bound is known. A token's spelling in the vocabulary has at most 4 bytes
    per character (byte-level vocabularies spell one byte per character, so this is loose),
    times 4 again when a normalizer may compose characters."""
    spec = json.loads(tokenizer.to_str())
    normalizer = spec.get("normalizer")
    kinds: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                kinds.add(str(node["type"]))
                if node["type"] == "Replace" and not node.get("content"):
                    kinds.add("<deletes>")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(normalizer)
    if not kinds <= _BOUNDED_NORMALIZERS:
        return None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    longest = max((len(t) for t in vocab), default=1)
    return longest * 4 * (4 if normalizer else 1)


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text":
            parts.append(str(part.get("text", "")))
    return "".join(parts)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas whose concatenation is the full decode.

    Byte-level tokens can end mid-character, and only the trailing incomplete character of
    a decode can still change (into a character, or a U+FFFD that stays): text is sent up
    to the last (at most ``HELD_REPLACEMENTS``) trailing U+FFFDs, which wait for the next
    token (or the flush). Decoding from ``prefix_offset`` (one token of context) keeps
    tokenizers that strip a leading space from a lone token honest (the vLLM scheme); the
    window moves on only where the decode ended on a whole character, or once it spans
    ``MAX_WINDOW`` tokens: an output that never ends on a whole character (bytes that
    are no UTF-8, which a tenant can force with ``logit_bias``) would otherwise be decoded
    whole at every token, quadratic in its length. Text that wide without one whole
    character at its end is not text: its held U+FFFDs are sent as they are.
    """

    # An incomplete UTF-8 character decodes to one U+FFFD per byte at most (byte fallback).
    HELD_REPLACEMENTS = 3
    # Tokens the window may span before it moves on regardless (a character is at most 4
    # bytes, so real text ends on a whole character far more often than this)
    MAX_WINDOW = 32

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0  # the decode of ids[prefix_offset:read_offset] is all sent
        self.sent = 0  # characters after that decode that were sent too
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=len(self.ids) - self.prefix_offset > self.MAX_WINDOW)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.ids[self.prefix_offset :])
        end = len(new_text)
        if not final:
            held = 0
            while held < self.HELD_REPLACEMENTS and new_text[end - held - 1 : end - held] == "\ufffd":
                held += 1
            end -= held
        start = len(prefix_text) + self.sent
        if end <= start:
            return ""
        delta = new_text[start:end]
        self.text += delta
        if end == len(new_text):  # nothing held: a whole character ends the decode
            self.prefix_offset, self.read_offset, self.sent = self.read_offset, len(self.ids), 0
        else:
            self.sent = end - len(prefix_text)
        return delta


class TextStream:
    """The text of a request's choices, made from their token ids where the events are
    read (the API server), not on the engine's step: for a request whose end does not
    depend on its text (``SamplingParams.reads_text`` is False) the engine sends ids
    alone. The same rules as the engine's own detokenizing (``sequence.append_token``):
    an end token (``SamplingParams.ends_on``) is never text, and a choice's last token
    flushes what was held back."""

    def __init__(self, tokenizer: TextTokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos_token_ids = tokenizer.eos_token_ids  # as the request started
        self.decoders: dict[int, IncrementalDecoder] = {}

    def text(self, ev: TokenEvent) -> str:
        decoder = self.decoders.get(ev.index)
        if decoder is None:
            decoder = self.decoders[ev.index] = IncrementalDecoder(self.tokenizer)
        ids = ev.token_ids
        if ev.final and ids and self.params.ends_on(ids[-1], self.eos_token_ids):
            ids = ids[:-1]
        parts = [decoder.push(t) for t in ids]
        if ev.final:
            parts.append(decoder.flush())
        return "".join(parts)


HERMES_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def hermes_tool_turns(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      turns: bool = True) -> list[dict[str, Any]]:
    """For a chat template that knows no tools: ``tools`` as a Hermes ``<tools>`` block at
    the start of the system turn and, with ``turns``, assistant ``tool_calls`` as
    ``<tool_call>`` text and ``tool`` results as ``<tool_response>`` in user turns
    (consecutive results share one): what the Hermes parser reads back and what Qwen-style
    templates write. Converted turns reach the template as plain ``role``/``content``."""
    out: list[dict[str, Any]] = []
    if tools:
        block = HERMES_TOOLS.format(tools="\n".join(_tojson(t) for t in tools))
        if messages and messages[0].get("role") == "system":
            system = messages[0].get("content") or ""
            out.append({"role": "system", "content": block + ("\n\n" + system if system else "")})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": block})
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if not turns:
            out.append(m)
        elif role == "assistant" and m.get("tool_calls"):
            calls = []
            for tc in m["tool_calls"]:
                fn = tc.get("function", tc) if isinstance(tc, dict) else {}
                args = fn.get("arguments", {})
                args_json = args if isinstance(args, str) else _tojson(args)
                calls.append(f'<tool_call>\n{{"name": {_tojson(fn.get("name"))}, '
                             f'"arguments": {args_json}}}\n</tool_call>')
            out.append({"role": "assistant", "content": "\n".join(([content] if content else [])
                                                                  + calls)})
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_results": True})
        else:
            out.append(m)
    return [{k: v for k, v in m.items() if k != "_tool_results"} for m in out]
