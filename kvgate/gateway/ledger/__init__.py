"""The ledger: tenants, API keys, price plans and usage events in SQL, billed exactly."""

from .auth import Principal
from .billing import Billed, Prices, UsageEvent, cost_micros
from .db import migrates_on_start
from .errors import (
    CacheBudgetExceeded,
    Conflict,
    InvalidInput,
    LedgerError,
    LedgerFileLost,
    LedgerUnavailable,
    NotFound,
    SchemaOutdated,
)
from .ledger import Health, Ledger

__all__ = ["Billed", "CacheBudgetExceeded", "Conflict", "Health", "InvalidInput", "Ledger", "LedgerError",
           "LedgerFileLost", "LedgerUnavailable", "NotFound", "Prices", "Principal",
           "SchemaOutdated", "UsageEvent", "cost_micros", "migrates_on_start"]
