"""Ledger errors, so callers (HTTP handlers, the CLI) can map each to the right answer."""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every error the ledger raises on purpose (HTTP 500/503 when unmapped)."""


class NotFound(LedgerError):
    """The tenant, key or plan named does not exist (HTTP 404)."""


class Conflict(LedgerError):
    """The change clashes with existing data, e.g. a taken tenant name (HTTP 409)."""


class CacheBudgetExceeded(Conflict):
    """A new explicit cache would take the tenant's live caches past their bound."""

    def __init__(self, tokens: int, left: int, budget: int, everyone: bool = False) -> None:
        whose = "all tenants' explicit caches together" if everyone else (
            "the tenant's explicit caches")
        super().__init__(f"this cache is {tokens} tokens; {whose} may hold {budget} tokens "
                         f"and {left} are left")
        self.tokens, self.left, self.budget, self.everyone = tokens, left, budget, everyone


class InvalidInput(LedgerError, ValueError):
    """An argument is out of range or unknown (HTTP 400); also a ValueError for plain callers."""


class SchemaOutdated(LedgerError):
    """The database schema is not the one this code expects; the message says what to run."""


class LedgerUnavailable(LedgerError):
    """The database cannot be reached or written now (HTTP 503 with Retry-After)."""


class LedgerFileLost(LedgerUnavailable):
    """The SQLite file was deleted or replaced under the running server: it stops writing
    (a file nobody reads bills nobody) until it is restarted on the file meant."""
