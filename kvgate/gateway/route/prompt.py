"""The prompt a replica will run, as the router computes it: the protocol layer's parsing
and rendering (chat messages, tools, Anthropic conversations), the replicas' own, the model's tokenizer and
chat template, and the cache's chained block hashes in the tenant's namespace.

The router never refuses a request for its body: whatever it cannot render (a body the
replica will reject, a Responses API continuation stored in the ledger) gets no hashes,
and the replica answers it, errors included, in the API's own shape.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from kvgate.cachestore.hashing import block_hashes, root_digest
from kvgate.gateway.engine import EngineConfig, demo, gguf
from kvgate.gateway.engine.loader import load_tokenizer
from kvgate.gateway.engine.tokenizer import TextTokenizer
from kvgate.gateway.protocol.anthropic import parse_conversation
from kvgate.gateway.protocol.namespace import tenant_namespace
from kvgate.gateway.protocol.openai_chat import chat_prompt
from kvgate.gateway.protocol.openai_tools import checked_tools
from kvgate.gateway.route.choose import OPENS, TURN

MAX_ROUTED_BYTES = 4 * 1024 * 1024  # bodies beyond this are routed without rendering


@functools.cache
def tokenizer_for(model: str) -> TextTokenizer:
    """The tokenizer ``kvgate serve --model`` loads for the same value: a GGUF model
    (``smollm2``, a ``.gguf`` file) from its converted directory, converted on first use as
    the replicas do. Bounded by the model's context as a replica's is
    (``TextTokenizer.check_length``): a text longer than any replica runs is not tokenized
    (a 4 MB prompt would cost the router seconds and most of a gigabyte, for a request the
    replica refuses at once)."""
    if model in demo.SHAPES:
        tokenizer = demo.build_tokenizer()
        tokenizer.max_tokens = demo.MAX_POSITIONS
        return tokenizer
    if gguf.is_gguf(model):
        path = gguf.resolve(model, EngineConfig(model=model).torch_dtype)
    else:
        path = Path(model).expanduser()
    tokenizer = load_tokenizer(path)
    tokenizer.max_tokens = _context_length(path)
    return tokenizer


def _context_length(path: Path) -> int | None:
    """The model's own context (``max_position_embeddings``): no replica's is longer."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    n = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return n if type(n) is int and n > 0 else None


def model_id_of(model: str) -> str:
    """The id replicas serving ``--model`` report (``/admin/load``'s ``model_id``)."""
    if model in demo.SHAPES:
        return model
    if gguf.is_gguf(model):
        return gguf.served_id(model)
    return Path(model).expanduser().resolve().name


class PromptRenderer:
    """Renders and tokenizes request bodies the way a replica's engine does (a
    ``protocol.render.ChatRenderer``, as the engine is)."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer

    def render_chat(self, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tools=tools)

    def token_ids(self, path: str, body: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids, or None where the router does not render this body."""
        if path == "/v1/chat/completions":
            return chat_prompt(self, body, checked_tools(body))
        if path == "/v1/messages":
            return parse_conversation(body).render(self)
        if path == "/v1/completions":
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
                prompt = prompt[0]  # several prompts: the first one decides
            if isinstance(prompt, str):
                return self.tokenizer.encode(prompt)
            if isinstance(prompt, list) and all(type(t) is int for t in prompt):
                return list(prompt)
        return None

    def hashes(self, path: str, raw: bytes, tenant_id: int, model_id: str,
               block_size: int) -> list[bytes]:
        """The block hashes a replica's cache gives this request's prompt (empty: none)."""
        return self.hashes_of(path, parse_body(raw), tenant_id, model_id, block_size)

    def hashes_of(self, path: str, body: dict[str, Any] | None, tenant_id: int,
                  model_id: str, block_size: int) -> list[bytes]:
        """``hashes`` of a body parsed already (``parse_body``)."""
        if body is None:
            return []
        try:
            ids = self.token_ids(path, body)
        except Exception:  # any body the replica will judge itself
            return []
        limit = self.tokenizer.max_tokens
        if not ids or (limit is not None and len(ids) > limit):  # no replica runs it
            return []
        root = root_digest(model_id, "", tenant_namespace(tenant_id))
        try:
            return block_hashes(root, ids, block_size)
        except (ValueError, OverflowError, TypeError):
            return []


def parse_body(raw: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None (too big to route by, or not one: the replica
    judges such a body itself). Parsed once per request, off the event loop when big: a
    4 MB body of small objects takes up to a second."""
    if len(raw) > MAX_ROUTED_BYTES:
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def names_cache_key(raw: bytes) -> bool:
    """Whether the body may name a cache key at all (most do not: no need to parse them
    for one)."""
    return b"prompt_cache_key" in raw or b"user_id" in raw


def cache_key_of(raw: bytes) -> str | None:
    """The request's ``prompt_cache_key`` (OpenAI) or ``metadata.user_id`` (Anthropic), if
    it names one the replica would accept (``protocol.cache_request``); None otherwise."""
    return cache_key_in(parse_body(raw)) if names_cache_key(raw) else None


def cache_key_in(body: dict[str, Any] | None) -> str | None:
    """``cache_key_of`` a body parsed already (``parse_body``)."""
    if body is None:
        return None
    key = body.get("prompt_cache_key")
    if key is None and isinstance(body.get("metadata"), dict):
        key = body["metadata"].get("user_id")
    return key if isinstance(key, str) and 0 < len(key) <= 256 and key.isprintable() else None


def conversation_turn(path: str, body: dict[str, Any] | None) -> int:
    """``choose.OPENS`` for a chat (or Anthropic Messages) request with no assistant turn
    yet, the first of a conversation; ``choose.TURN`` for one that carries an earlier
    answer; 0 for anything else (``RecentShare`` counts conversations ahead by it)."""
    if body is None or path not in ("/v1/chat/completions", "/v1/messages"):
        return 0
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return 0
    answered = any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
    return TURN if answered else OPENS
