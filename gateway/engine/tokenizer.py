"""The engine's tokenizer: a ``tokenizers.Tokenizer`` plus the chat template and stop ids.

The engine never uses transformers' tokenizer classes: ``tokenizer.json`` plus a Jinja chat
template is all a Llama/Mistral/Qwen2 directory needs, and this keeps tokenizing cheap.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer


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
        known = {t: tokenizer.token_to_id(t) for t in eos_tokens or []}
        eos = [t for t, i in known.items() if i is not None]
        self.eos_token_ids: list[int] = list(dict.fromkeys(
            i for i in known.values() if i is not None))
        self.eos_token = eos[0] if eos else None
        self.special_ids: set[int] = {
            i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
        }
        self._template = None
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

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Chat messages → prompt text; list-of-parts content is flattened to its text parts."""
        if self._template is None:
            raise ValueError("this model has no chat template; use /v1/completions with a raw prompt")
        flat = [{**m, "content": _text_of(m.get("content"))} for m in messages]
        return self._template.render(
            messages=flat,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Rendered text → ids; special tokens in the template text become their ids."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)


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
    """Turns a growing list of ids into text deltas without splitting a UTF-8 character.

    Byte-level tokens can end mid-character; a decode that ends in U+FFFD is held back until
    the next token completes it (or the stream ends, when it is flushed as it is). Decoding
    from ``prefix_offset`` (one token of context) keeps tokenizers that strip a leading space
    from a lone token honest (the vLLM scheme).
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0  # ids before this are already emitted as text
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.ids[self.prefix_offset :])
        held = len(self.ids) - self.read_offset
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final and held < 4):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
