"""kvgate: the multi-tenant prompt-caching gateway (HTTP API, engine, ledger)."""

__version__ = "0.1.0"
