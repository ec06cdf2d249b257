"""The HTTP service: OpenAI- and Anthropic-compatible API, admin API, metrics."""

from gateway.http.app import create_app

__all__ = ["create_app"]
