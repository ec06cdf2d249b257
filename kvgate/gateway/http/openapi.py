"""The OpenAPI 3.1 description of this server's own endpoints (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

_REF = "#/components/schemas/"


def _ref(name: str) -> dict:
    return {"$ref": _REF + name}


def _json_body(schema: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


def _responses(ok: str | None, errors: tuple[int, ...], error_schema: str = "OpenAIError",
               ok_status: str = "200", sse: bool = False) -> dict:
    out: dict[str, Any] = {}
    content: dict[str, Any] = {"application/json": {"schema": _ref(ok) if ok else {
        "type": "object"}}}
    if sse:
        # One server-sent event: `data` is a JSON chunk (OpenAI: or `[DONE]`); Anthropic
        # streams name each event.
        content["text/event-stream"] = {"schema": {
            "type": "object", "required": ["data"], "properties": {
                "event": {"type": "string"}, "data": {"type": "string"},
                "id": {"type": "string"}, "retry": {"type": "integer"}}}}
    out[ok_status] = {"description": "OK", "content": content}
    for code in errors:
        out[str(code)] = {"description": "Error",
                          "content": {"application/json": {"schema": _ref(error_schema)}}}
    return out


_CLIENT = (400, 401, 403, 404, 413, 415, 429, 503)
_ADMIN = (400, 401, 403, 404, 409)
_text_part = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_cache_control = {"type": "object", "required": ["type"], "properties": {
    "type": {"const": "ephemeral"}, "ttl": {"enum": ["5m", "1h"]}}}
_anthropic_block = {"type": "object", "required": ["type", "text"], "properties": {
    "type": {"const": "text"}, "text": {"type": "string"}, "cache_control": _cache_control}}
_tool_use_block = {"type": "object", "required": ["type", "id", "name", "input"], "properties": {
    "type": {"const": "tool_use"}, "id": {"type": "string", "minLength": 1},
    "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,128}$"}, "input": {"type": "object"},
    "cache_control": _cache_control}}
_tool_result_block = {"type": "object", "required": ["type", "tool_use_id"], "properties": {
    "type": {"const": "tool_result"}, "tool_use_id": {"type": "string", "minLength": 1},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _anthropic_block}]},
    "is_error": {"type": "boolean"}, "cache_control": _cache_control}}
_anthropic_tool = {"type": "object", "required": ["name", "input_schema"], "properties": {
    "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,128}$"},
    "description": {"type": "string"}, "cache_control": _cache_control,
    "input_schema": {"type": "object", "required": ["type"], "properties": {
        "type": {"const": "object"}, "properties": {"type": "object"},
        "required": {"type": "array", "items": {"type": "string"}}}}}}
_anthropic_tool_choice = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["auto", "any", "tool", "none"]}, "name": {"type": "string"},
    "disable_parallel_tool_use": {"type": "boolean"}}}
_anthropic_messages = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {
            "anyOf": [_anthropic_block, _tool_use_block, _tool_result_block]}}]}}}}
_anthropic_system = {"anyOf": [{"type": "string"}, {"type": "array", "items": _anthropic_block}]}

# OpenAI function tools (chat completions)
_openai_tool = {"type": "object", "required": ["type", "function"], "properties": {
    "type": {"const": "function"}, "function": {"type": "object", "required": ["name"],
                                                "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "description": {"type": "string"}, "parameters": {"type": "object"},
        "strict": {"type": "boolean"}}}}}
_openai_tool_call = {"type": "object", "required": ["id", "type", "function"], "properties": {
    "id": {"type": "string"}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"], "properties": {
        "name": {"type": "string"}, "arguments": {"type": "string"}}}}}
_openai_tool_choice = {"anyOf": [
    {"enum": ["none", "auto", "required"]},
    {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"}, "function": {
            "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}

# Sampling fields both OpenAI routes take (penalties, bias, n, vLLM's extras).
_SAMPLING: dict[str, Any] = {
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "minimum": 0.01, "maximum": 100},
    "logit_bias": {"type": "object", "additionalProperties": {
        "type": "number", "minimum": -100, "maximum": 100}},
    "top_k": {"type": "integer", "minimum": -1},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "ignore_eos": {"type": "boolean"},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
}

# What a request asks of the prompt cache (``http/cache_params.py``), OpenAI's spelling
_CACHE_REQUEST: dict[str, Any] = {
    "prompt_cache_retention": {"enum": ["in_memory", "24h", None], "description":
                               "How long its cache writes are kept (and billed): the "
                               "tenant's TTL, or 24 hours (the 24h write class)."},
    "prompt_cache_options": {"type": "object", "additionalProperties": False, "properties": {
        "ttl": {"enum": ["30m"]}, "mode": {"enum": ["implicit"]}}},
    "prompt_cache_key": {"type": ["string", "null"], "minLength": 1, "maxLength": 64,
                         "description": "Kept with the bill; the router's affinity key. "
                         "Never shared across tenants."},
}

# vLLM's request priority (``http/scheduling.py``), on every generating route
_PRIORITY: dict[str, Any] = {"priority": {
    "type": "integer", "minimum": -1000, "maximum": 1000, "default": 0,
    "description": "Lower runs first under contention; below the tenant's min_priority "
                   "(0 unless the operator set it) is a 400."}}

SCHEMAS: dict[str, Any] = {
    "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
    "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
        "type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"],
                                              "properties": {"type": {"type": "string"},
                                                             "message": {"type": "string"}}}}},
    "ChatMessage": {"type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _text_part},
                              {"type": "null"}]},
        "tool_calls": {"type": "array", "items": _openai_tool_call},  # assistant
        "tool_call_id": {"type": "string"}}},  # tool: the call it answers
    "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
        "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "seed": {"type": "integer"},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                "maxItems": 4}]},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {
            "include_usage": {"type": "boolean"}}},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "tools": {"type": "array", "items": _openai_tool},
        "tool_choice": _openai_tool_choice, "parallel_tool_calls": {"type": "boolean"},
        "cached_content": {"type": "string", "pattern": "^cache_",
                           "description": "An explicit cache (POST /v1/caches) whose messages "
                           "(and tools) go first in the prompt"},
        **_SAMPLING, **_CACHE_REQUEST, **_PRIORITY, "user": {"type": "string"}}},
    "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": {
        "model": {"type": "string"},
        "prompt": {"anyOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "integer", "minimum": 0}},
            {"type": "array", "maxItems": 64, "items": {"anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "integer", "minimum": 0}}]}}]},
        "echo": {"type": "boolean"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20}, **_SAMPLING,
        **_CACHE_REQUEST, **_PRIORITY,
        "max_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "seed": {"type": "integer"}, "stream": {"type": "boolean"},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}}},
    "Usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens",
                                             "total_tokens", "prompt_tokens_details"],
              "properties": {"prompt_tokens": {"type": "integer"},
                             "completion_tokens": {"type": "integer"},
                             "total_tokens": {"type": "integer"},
                             "prompt_tokens_details": {"type": "object", "properties": {
                                 "cached_tokens": {"type": "integer"},
                                 "cache_write_tokens": {"type": "integer"}}}}},
    "ChatCompletion": {"type": "object", "required": ["id", "object", "choices", "usage"],
                       "properties": {"id": {"type": "string"},
                                      "object": {"const": "chat.completion"},
                                      "choices": {"type": "array"}, "usage": _ref("Usage")}},
    "Completion": {"type": "object", "required": ["id", "object", "choices", "usage"],
                   "properties": {"id": {"type": "string"},
                                  "object": {"const": "text_completion"},
                                  "choices": {"type": "array"}, "usage": _ref("Usage")}},
    "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array"}}},
    "MessagesRequest": {"type": "object", "required": ["model", "max_tokens", "messages"],
                        "properties": {
        "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
        "system": _anthropic_system, "messages": _anthropic_messages,
        "tools": {"type": "array", "items": _anthropic_tool},
        "tool_choice": _anthropic_tool_choice,
        "cache_control": _cache_control,
        "cached_content": {"type": "string", "pattern": "^cache_",
                           "description": "An explicit cache (POST /v1/caches) whose messages "
                           "(system and tools) go first in the prompt"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0},
        "stop_sequences": {"type": "array", "items": {"type": "string"}},
        "metadata": {"type": "object", "additionalProperties": False, "properties": {
            "user_id": {"type": ["string", "null"], "maxLength": 128,
                        "description": "Kept with the bill; the router's affinity key."}}},
        **_PRIORITY, "stream": {"type": "boolean"}}},
    "Message": {"type": "object", "required": ["id", "type", "content", "usage"], "properties": {
        "id": {"type": "string"}, "type": {"const": "message"}, "content": {"type": "array"},
        "usage": {"type": "object", "required": ["input_tokens", "output_tokens",
                                                 "cache_read_input_tokens",
                                                 "cache_creation_input_tokens"]}}},
    "CountTokensRequest": {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string"}, "system": _anthropic_system,
        "messages": _anthropic_messages, "tools": {"type": "array", "items": _anthropic_tool},
        "tool_choice": _anthropic_tool_choice}},
    "CountTokens": {"type": "object", "required": ["input_tokens"], "properties": {
        "input_tokens": {"type": "integer", "minimum": 0}}},
    "Model": {"type": "object", "required": ["id", "object", "created", "owned_by"],
              "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                             "created": {"type": "integer"}, "owned_by": {"type": "string"},
                             "max_model_len": {"type": "integer"}}},
    "TokenizeRequest": {"type": "object", "properties": {
        "model": {"type": "string"}, "prompt": {"type": "string"},
        "add_special_tokens": {"type": "boolean"},
        "messages": {"type": "array", "minItems": 1, "items": _ref("ChatMessage")},
        "tools": {"type": "array", "items": {"type": "object"}}}},
    "Tokenized": {"type": "object", "required": ["count", "max_model_len", "tokens"],
                  "properties": {"count": {"type": "integer"},
                                 "max_model_len": {"type": "integer"},
                                 "tokens": {"type": "array", "items": {"type": "integer"}}}},
    "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
        "model": {"type": "string"},
        "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}},
    "Detokenized": {"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"type": "string"}}},
    "ResponseCreate": {"type": "object", "required": ["model", "input"], "properties": {
        "model": {"type": "string"}, **_CACHE_REQUEST,
        "cached_content": {"type": "string", "pattern": "^cache_",
                           "description": "An explicit cache (POST /v1/caches) whose turns "
                           "(and tools) go first in the input"},
        "input": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {
            "anyOf": [{
                "type": "object", "required": ["role", "content"], "properties": {
                    "type": {"const": "message"},
                    "role": {"enum": ["system", "developer", "user", "assistant"]},
                    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {
                        "type": "object", "required": ["type", "text"], "properties": {
                            "type": {"enum": ["input_text", "output_text"]},
                            "text": {"type": "string"}}}}]}}},
                {"type": "object", "required": ["type", "call_id", "name", "arguments"],
                 "properties": {"type": {"const": "function_call"},
                                "call_id": {"type": "string", "minLength": 1, "maxLength": 64},
                                "name": {"type": "string", "minLength": 1},
                                "arguments": {"type": "string"}}},
                {"type": "object", "required": ["type", "call_id", "output"],
                 "properties": {"type": {"const": "function_call_output"},
                                "call_id": {"type": "string", "minLength": 1, "maxLength": 64},
                                "output": {"type": "string"}}}]}}]},
        "tools": {"type": "array", "items": {
            "type": "object", "required": ["type", "name"], "properties": {
                "type": {"const": "function"},
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": "string"},
                "parameters": {"type": "object"}, "strict": {"type": "boolean"}}}},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto", "required"]}, {
            "type": "object", "required": ["type", "name"], "properties": {
                "type": {"const": "function"}, "name": {"type": "string"}}}]},
        "parallel_tool_calls": {"type": "boolean"},
        "instructions": {"type": "string"},
        "max_output_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1}, **_PRIORITY,
        "stream": {"type": "boolean"}, "store": {"type": "boolean"},
        "previous_response_id": {"type": "string"},
        "metadata": {"type": "object", "maxProperties": 16,
                     "additionalProperties": {"type": "string", "maxLength": 512}},
        "text": {"type": "object", "properties": {"format": {
            "type": "object", "required": ["type"], "properties": {
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "name": {"type": "string"}, "schema": {"type": "object"},
                "strict": {"type": "boolean"}}}}}}},
    "Response": {"type": "object", "required": ["id", "object", "status", "output"],
                 "properties": {"id": {"type": "string"}, "object": {"const": "response"},
                                "status": {"type": "string"}, "output": {"type": "array"},
                                "usage": {"type": ["object", "null"]}}},
    "Receipt": {
        "type": "object", "description": "A billed request's signed receipt. The signature "
        "(Ed25519, base64url) covers every other field, serialised with sorted keys, no "
        "whitespace, UTF-8; verify it with the key at /.well-known/kvgate-receipt-key or "
        "`kvgate receipts verify`.",
        "required": ["object", "version", "id", "request_id", "tenant_id", "model",
                     "endpoint", "status", "started_at", "finished_at", "tokens", "plan",
                     "currency", "cost_micros", "blocks", "key_id", "signature_alg",
                     "signature"],
        "properties": {
            "object": {"const": "receipt"}, "version": {"const": 1},
            "id": {"type": "string"}, "request_id": {"type": "string"},
            "tenant_id": {"type": "integer"}, "model": {"type": "string"},
            "endpoint": {"type": "string"},
            "status": {"enum": ["ok", "cancelled", "error", "interrupted"]},
            "started_at": {"type": "string"}, "finished_at": {"type": "string"},
            "tokens": {"type": "object", "properties": {
                k: {"type": "integer", "minimum": 0} for k in (
                    "prompt", "cached", "cache_write_5m", "cache_write_1h", "uncached",
                    "completion")}},
            "plan": {"type": "object", "properties": {
                "id": {"type": ["integer", "null"]}, "name": {"type": ["string", "null"]},
                "prices": {"type": "object", "description": "Micro-units per million "
                           "tokens: input, cache_read, cache_write_5m, cache_write_1h, "
                           "output"}}},
            "currency": {"type": "string"},
            "cost_micros": {"type": "integer", "minimum": 0},
            "blocks": {"type": "object", "properties": {
                "read": {"type": "array", "items": {"type": "object", "properties": {
                    "hash": {"type": "string"},
                    "tier": {"enum": ["device", "host", "disk", "shared"]}}}},
                "written": {"type": "array", "items": {"type": "object", "properties": {
                    "hash": {"type": "string"}, "ttl_s": {"type": "integer"},
                    "ttl_class": {"enum": ["5m", "1h"]}}}}}},
            "key_id": {"type": "string"}, "signature_alg": {"const": "Ed25519"},
            "signature": {"type": "string"}}},
    "ReceiptKey": {"type": "object",
                   "required": ["key_id", "algorithm", "public_key_pem", "jwk"],
                   "properties": {"key_id": {"type": "string"},
                                  "algorithm": {"const": "Ed25519"},
                                  "public_key_pem": {"type": "string"},
                                  "jwk": {"type": "object"}}},
    "ResponseDeleted": {"type": "object", "required": ["id", "object", "deleted"],
                        "properties": {"id": {"type": "string"},
                                       "object": {"const": "response"},
                                       "deleted": {"const": True}}},
    "CacheCreate": {
        "type": "object", "description": "A prompt prefix in either API's shape: OpenAI "
        "(messages, tools) or Anthropic (system, messages, tools). A missing TTL is the "
        "tenant's default; at most the tenant's cache_max_ttl_seconds.",
        "required": ["messages"], "properties": {
            "messages": {"type": "array", "minItems": 1},
            "system": _anthropic_system, "tools": {"type": "array"},
            "ttl": {"type": "string", "pattern": "^[0-9]{1,9}s$", "examples": ["3600s"]},
            "ttl_seconds": {"type": "integer", "minimum": 1},
            "display_name": {"type": "string", "maxLength": 128},
            "model": {"type": "string"}}},
    "CacheUpdate": {"type": "object", "description": "A new TTL, counted from now.",
                    "properties": {"ttl": {"type": "string", "pattern": "^[0-9]{1,9}s$"},
                                   "ttl_seconds": {"type": "integer", "minimum": 1}}},
    "Cache": {"type": "object", "required": ["id", "object", "model", "tokens", "created_at",
                                             "expires_at", "ttl_seconds"],
              "properties": {
                  "id": {"type": "string"}, "object": {"const": "cache"},
                  "display_name": {"type": ["string", "null"]}, "model": {"type": "string"},
                  "tokens": {"type": "integer"}, "created_at": {"type": "integer"},
                  "expires_at": {"type": "integer"},
                  "ttl_seconds": {"type": "integer", "description": "Seconds left"},
                  "usage": {"type": "object", "description": "POST only: the prefill's "
                            "usage, billed as a request (endpoint caches)"}}},
    "CacheList": {"type": "object", "required": ["object", "data"], "properties": {
        "object": {"const": "list"}, "data": {"type": "array", "items": _ref("Cache")}}},
    "CacheDeleted": {"type": "object", "required": ["id", "object", "deleted"],
                     "properties": {"id": {"type": "string"},
                                    "object": {"const": "cache.deleted"},
                                    "deleted": {"const": True}}},
    "TenantCreate": {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1}, "plan": {"type": "string"},
        "cache_ttl_seconds": {"type": "integer", "minimum": 0},
        "cache_quota_bytes": {"type": "integer", "minimum": 0},
        "cache_reserved_device_bytes": {"type": ["integer", "null"], "minimum": 0,
                                        "description": "Reserved device cache on each "
                                        "replica, billed per GiB-hour; 409 past the tier."},
        "cache_reserved_host_bytes": {"type": ["integer", "null"], "minimum": 0},
        "cache_max_ttl_seconds": {"type": "integer", "minimum": 0,
                                  "description": "The longest cache TTL a request may ask."},
        "cache_share_bytes": {"type": ["integer", "null"], "minimum": 0, "deprecated": True,
                              "description": "The former field: a reservation on both tiers."},
        "requests_per_minute": {"type": "integer", "minimum": 0},
        "tokens_per_minute": {"type": "integer", "minimum": 0},
        "max_concurrent": {"type": "integer", "minimum": 0},
        "budget_daily_micros": {"type": ["integer", "null"], "minimum": 0,
                                "description": "Spend budget per UTC day in micro-units of "
                                "the plan's currency; past it, 429 budget_exceeded."},
        "budget_monthly_micros": {"type": ["integer", "null"], "minimum": 0,
                                  "description": "Spend budget per UTC month."},
        "min_priority": {"type": ["integer", "null"], "minimum": -1000, "maximum": 1000,
                         "description": "The lowest request priority its requests may ask "
                         "for (lower runs first); default 0."},
        "max_running_sequences": {"type": ["integer", "null"], "minimum": 1,
                                  "description": "How many of its sequences may run at "
                                  "once; null: no cap of its own."}}},
}


_RECEIPT_LIMIT = {"name": "limit", "in": "query", "required": False,
                  "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 20}}


def _op(summary: str, responses: dict[str, Any], body: str | None = None,
        **extra: Any) -> dict[str, Any]:
    op = {"summary": summary, "responses": responses, **extra}
    if body:
        op["requestBody"] = _json_body(body)
    return op


_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
_TIME_FORMS = ("A date (2026-11-30, midnight UTC), a time without a zone (2026-11-30T10:00:00, "
               "taken as UTC), a time with one (2026-11-30T10:00:00+02:00, encode '+' as "
               "%2B; or ...Z), or a span back from now: 45s, 30m, 12h, 7d, 2w.")
_USAGE_PARAMS = [
    {"name": "tenant_id", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Only this tenant's usage (its id)."},
    {"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Start of the range, inclusive, on the requests' start time. "
                    + _TIME_FORMS, "examples": {"date": {"value": "2026-11-30"},
                                                "span": {"value": "7d"}}},
    {"name": "until", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "End of the range, exclusive; same forms as since, and after it.",
     "examples": {"aware": {"value": "2026-11-30T10:00:00Z"}}},
    {"name": "group_by", "in": "query", "required": False,
     "schema": {"enum": ["tenant", "key", "model", "day"], "default": "day"},
     "description": "One row per tenant (id, name), key (id, prefix, tenant), model or UTC "
                    "day; rows are also split by the currency of the tenants' plans: every "
                    "row names its currency, the totals do when all rows share one."},
]
_PUBLIC: dict[str, Any] = {"security": []}  # no key needed
_SERIES_PARAMS = [
    {"name": "bucket", "in": "query", "required": False,
     "schema": {"enum": ["hour", "day", "all"], "default": "hour"},
     "description": "One row per UTC hour or day (with its start), or one over the whole "
                    "range. A bucketed query without since starts 24 hours (hour) or 30 days "
                    "(day) back; at most 1000 buckets per answer."},
    {"name": "group_by", "in": "query", "required": False,
     "schema": {"enum": ["none", "tenant", "key", "model"], "default": "none"},
     "description": "Split each bucket by tenant (id, name), key (id, prefix) or model. Rows "
                    "are also split by currency."},
    *[p for p in _USAGE_PARAMS if p["name"] != "group_by"],
    {"name": "key_id", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "Only this key's usage (its id)."},
    {"name": "model", "in": "query", "required": False,
     "schema": {"type": "string", "maxLength": 256}, "description": "Only this model's usage."},
]
_PREFIX_PARAMS = [
    {"name": "tenant_id", "in": "query", "required": True, "schema": {"type": "string"}},
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10}},
]
_HTML = {"200": {"description": "The console page (public: it holds no data; it calls the "
                                "admin API with the admin key typed into it)",
                 "content": {"text/html": {"schema": {"type": "string"}}}}}


def spec() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvgate", "version": "0.1.0",
                 "description": "Multi-tenant prompt-caching gateway (OpenAI and Anthropic "
                                "compatible)."},
        "components": {"schemas": SCHEMAS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}},
        "security": [{"bearer": []}, {"apiKey": []}],
        "paths": {
            "/v1/models": {"get": _op("List models", _responses("ModelList", (401, 403)))},
            "/v1/models/{model}": {"parameters": [{
                "name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "get": _op("Retrieve a model", _responses("Model", (401, 403, 404)))},
            "/v1/messages/count_tokens": {"post": _op(
                "Count a message's input tokens (nothing generated or billed)",
                _responses("CountTokens", _CLIENT, "AnthropicError"), "CountTokensRequest")},
            "/tokenize": {"post": _op("Tokenize a prompt or chat messages (not billed)",
                                      _responses("Tokenized", _CLIENT), "TokenizeRequest")},
            "/detokenize": {"post": _op("Token ids back to text (not billed)",
                                        _responses("Detokenized", _CLIENT),
                                        "DetokenizeRequest")},
            "/v1/chat/completions": {"post": _op(
                "Chat completion", _responses("ChatCompletion", _CLIENT, sse=True),
                "ChatCompletionRequest")},
            "/v1/completions": {"post": _op(
                "Text completion", _responses("Completion", _CLIENT, sse=True),
                "CompletionRequest")},
            "/v1/messages": {"post": _op(
                "Anthropic message", _responses("Message", _CLIENT, "AnthropicError", sse=True),
                "MessagesRequest")},
            "/v1/responses": {"post": _op(
                "Create a response (OpenAI Responses API)",
                _responses("Response", _CLIENT, sse=True), "ResponseCreate")},
            "/v1/responses/{id}": {
                "parameters": _ID,
                "get": _op("Get a stored response", _responses("Response", (400, 401, 403, 404,
                                                                          503))),
                "delete": _op("Delete a stored response",
                              _responses("ResponseDeleted", (401, 403, 404, 503)))},
            "/v1/receipts": {"get": _op(
                "The tenant's latest billing receipts, newest first (summaries: id, request "
                "id, time, endpoint, status, tokens, cost)", _responses(None, (400, 401, 503)),
                parameters=[_RECEIPT_LIMIT])},
            "/admin/caches": {"get": _op(
                "One tenant's live explicit caches (id, name, tokens, expiry; never the "
                "text), for the console", _responses(None, _ADMIN), parameters=[
                    {"name": "tenant_id", "in": "query", "required": True,
                     "schema": {"type": "string"}}])},
            "/admin/receipts": {"get": _op(
                "One tenant's latest billing receipts (summaries), for the console",
                _responses(None, _ADMIN), parameters=[
                    {"name": "tenant_id", "in": "query", "required": True,
                     "schema": {"type": "string"}}, _RECEIPT_LIMIT])},
            "/v1/receipts/{id}": {
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "string"}}],
                "get": _op("Get one of the tenant's billing receipts (its id is in the "
                           "kvgate-receipt-id header of every billed answer); another "
                           "tenant's receipt is 404, like one that does not exist",
                           _responses("Receipt", (401, 403, 404, 503)))},
            "/v1/caches": {
                "post": _op("Create an explicit cache: the prefix is computed once (billed "
                            "as a request) and pinned until it expires or is deleted; its "
                            "storage is billed per token-hour. 409 past the tenant's budget",
                            _responses("Cache", (*_CLIENT, 409)), "CacheCreate"),
                "get": _op("List the tenant's live caches",
                           _responses("CacheList", (401, 403, 503)))},
            "/v1/caches/{id}": {
                "parameters": _ID,
                "get": _op("Get one of the tenant's caches (another tenant's is 404)",
                           _responses("Cache", (401, 403, 404, 503))),
                "patch": _op("Give a cache a new TTL", _responses(
                    "Cache", (400, 401, 403, 404, 503)), "CacheUpdate"),
                "delete": _op("Delete a cache (its blocks are unpinned)",
                              _responses("CacheDeleted", (401, 403, 404, 503)))},
            "/.well-known/kvgate-receipt-key": {"get": _op(
                "The public key receipts are signed with (PEM and JWK, with its key id)",
                _responses("ReceiptKey", (404,)), **_PUBLIC)},
            "/admin/tenants": {
                "get": _op("List tenants", _responses(None, (401, 403))),
                "post": _op("Create tenant", _responses(None, _ADMIN, ok_status="201"),
                            "TenantCreate")},
            "/admin/tenants/{id}": {
                "parameters": _ID,
                "get": _op("Get tenant", _responses(None, _ADMIN)),
                "patch": _op("Update tenant", _responses(None, _ADMIN)),
                "delete": _op("Delete tenant", _responses(None, _ADMIN))},
            "/admin/tenants/{id}/keys": {
                "parameters": _ID,
                "get": _op("List keys", _responses(None, _ADMIN)),
                "post": _op("Create key (shown once)",
                            _responses(None, _ADMIN, ok_status="201"))},
            "/admin/tenants/{id}/budget": {
                "parameters": _ID,
                "get": _op("Spend budgets and spend this UTC day and month (micro-units of "
                           "the plan's currency), the tenant's and each key's",
                           _responses(None, _ADMIN))},
            "/admin/keys/{id}": {"parameters": _ID,
                                 "patch": _op("Set a key's own spend budgets "
                                              "(budget_daily_micros, budget_monthly_micros; "
                                              "null clears one)", _responses(None, _ADMIN)),
                                 "delete": _op("Revoke key", _responses(None, _ADMIN))},
            "/admin/usage": {"get": _op("Usage report", _responses(None, _ADMIN),
                                        parameters=_USAGE_PARAMS)},
            "/admin/cache/stats": {"get": _op("Cache statistics", _responses(None, _ADMIN))},
            "/admin/load": {"get": _op(
                "This replica's identity and load for kvgate route: replica id, epoch, model "
                "id, block size, queue depth, running sequences, free device pages",
                _responses(None, _ADMIN))},
            "/admin/cache/snapshot": {"get": _op(
                "Every cached block (namespace, hash, tier) and the last cache event's "
                "number, for a router that missed cache events", _responses(None, _ADMIN))},
            "/admin/usage/series": {"get": _op(
                "Usage over time: requests, tokens by billed kind (uncached_input_tokens, "
                "cached_tokens, cache_write_5m_tokens, cache_write_1h_tokens, "
                "completion_tokens), cost and what the cache saved (saved_micros: cached "
                "tokens at the input price; net_saved_micros: less the cache-read price), per "
                "hour or day", _responses(None, _ADMIN),
                parameters=_SERIES_PARAMS)},
            "/admin/cache/history": {"get": _op(
                "This process's cache statistics sampled over time (a bounded ring buffer): "
                "hit ratio, tier occupancy, evictions, requests and errors, TTFT hit vs miss "
                "(totals.ttft_by_prompt_length: per prompt-length band)",
                _responses(None, (401, 403)))},
            "/admin/cache/prefixes": {"get": _op(
                "A tenant's most-hit cached prefixes: hash, length, hits, tier, last use "
                "(never the text)", _responses(None, _ADMIN), parameters=_PREFIX_PARAMS)},
            "/admin/ui": {"get": _op("The operator console", _HTML, **_PUBLIC)},
            "/admin/cache": {"delete": _op("Flush a tenant's cache", _responses(None, _ADMIN),
                                           parameters=[{"name": "tenant_id", "in": "query",
                                                        "required": True,
                                                        "schema": {"type": "string"}}])},
            "/healthz": {"get": _op("Liveness", _responses(None, ()), **_PUBLIC)},
            "/health": {"get": _op("Liveness (vLLM's path)", _responses(None, ()), **_PUBLIC)},
            "/readyz": {"get": _op("Readiness", _responses(None, (503,)), **_PUBLIC)},
            # The metrics key or the admin key (README "Metrics access"); 404 on the API
            # port when --metrics-port serves it elsewhere.
            "/metrics": {"get": _op("Prometheus metrics", {
                **_responses(None, (401, 404, 503)), "200": {
                    "description": "OK",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}})},
            "/openapi.json": {"get": _op("This document", _responses(None, ()), **_PUBLIC)},
        },
    }
