"""The ledger: tenants, API keys, price plans and usage events in SQL, billed exactly."""

from .auth import Principal
from .billing import Billed, Prices, UsageEvent, cost_micros
from .db import migrates_on_start
from .errors import Conflict, InvalidInput, LedgerError, NotFound, SchemaOutdated
from .ledger import Ledger

__all__ = ["Billed", "Conflict", "InvalidInput", "Ledger", "LedgerError", "NotFound", "Prices",
           "Principal", "SchemaOutdated", "UsageEvent", "cost_micros",
           "migrates_on_start"]
