"""Errors in the shape of the API the client speaks.

OpenAI paths answer ``{"error": {"message", "type", "param", "code"}}``; ``/v1/messages``
answers Anthropic's ``{"type": "error", "error": {"type", "message"}}``. Handlers raise
``ApiError`` and never build error bodies themselves, so both shapes stay consistent.
"""

from __future__ import annotations

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """A failure the client should see, with the HTTP status that says whose fault it is."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, retry_after: float | None = None,
                 retry: bool | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after
        # False: ``x-should-retry: false``, which both official SDKs obey: a spent budget's
        # Retry-After is hours away, and an SDK that waits it out hangs its caller
        self.retry = retry


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def prompt_param(path: str) -> str:
    """The field that holds the prompt on ``path``, named in errors about it."""
    return {"/v1/completions": "prompt", "/v1/responses": "input"}.get(path, "messages")


def structured_param(path: str) -> str:
    """The field that asks for a structured output on ``path``."""
    return {"/v1/responses": "text.format", "/v1/messages": "output_format"}.get(
        path, "response_format")


def error_body(path: str, err: ApiError) -> dict:
    if is_anthropic_path(path):
        fallback = "api_error" if err.status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_TYPES.get(err.status, fallback)
        return {"type": "error", "error": {"type": kind, "message": err.message}}
    fallback = "server_error" if err.status >= 500 else "invalid_request_error"
    kind = _OPENAI_TYPES.get(err.status, fallback)
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}


def stream_error_event(path: str, err: ApiError) -> tuple[str | None, dict]:
    """(SSE event name, data) that ends a stream which fails after its first byte: OpenAI
    streams send ``data: {"error": {...}}``, Anthropic ones ``event: error`` with
    ``{"type": "error", "error": {...}}``, each the shape of that API's error bodies."""
    return ("error" if is_anthropic_path(path) else None), error_body(path, err)


