"""Child process for test_crash: records events from many tasks until it is killed.

It prints a request id only after ``record`` returned for it, so every id the parent
reads is one the ledger promised was committed.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime

from kvgate.gateway.ledger import Ledger, UsageEvent
from kvgate.gateway.usage import Usage


async def main(url: str, tenant_id: int) -> None:
    ledger = await Ledger.open(url, migrate=False)
    print("ready", flush=True)
    now = datetime.now(UTC)

    async def worker(w: int) -> None:
        for i in range(1_000_000):
            rid = f"{os.getpid()}-{w}-{i}"
            await ledger.record(UsageEvent(rid, tenant_id, None, "demo", "chat.completions",
                                           Usage(100, 20, {300: 16}, 5), "ok", now, now, 3))
            sys.stdout.write(rid + "\n")
            sys.stdout.flush()

    await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(64))), timeout=60)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
