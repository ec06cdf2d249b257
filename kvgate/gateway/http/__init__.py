"""The HTTP service: OpenAI- and Anthropic-compatible API, admin API, metrics.

``create_app`` is imported on first use, so ``kvgate migrate`` and the other ledger
commands (which load this package's ``serve`` module to register their CLI) start without
importing torch and the model code.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from kvgate.gateway.http.app import create_app

        return create_app
    raise AttributeError(f"module 'kvgate.gateway.http' has no attribute {name!r}")
