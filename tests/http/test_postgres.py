"""The gateway on a PostgreSQL ledger, as a multi-replica install runs it: the schema is
migrated by ``kvgate migrate`` (serve never migrates PostgreSQL), requests from the official
SDK are billed exactly once with the usage they reported, and a second replica on the same
database sees the same tenants and totals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import openai
import pytest

from testkit import MiB, ThreadServer
from tests.pg import pg_url  # noqa: F401  (a fixture)

FLAGS = {"device": "cpu", "device_cache_bytes": 16 * MiB, "host_cache_bytes": 16 * MiB,
         "default_max_tokens": 8}


def test_serve_refuses_an_unmigrated_postgres_ledger(pg_url: str,  # noqa: F811
                                                     tmp_path: Path) -> None:
    with pytest.raises(Exception, match="kvgate migrate"):
        ThreadServer(tmp_path, db=pg_url, **FLAGS).start()


def test_two_replicas_bill_once_into_one_postgres_ledger(pg_url: str,  # noqa: F811
                                                         tmp_path: Path) -> None:
    migrate = subprocess.run([sys.executable, "-m", "kvgate.gateway.cli", "migrate", "--db", pg_url],
                             capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr
    with ThreadServer(tmp_path / "first", db=pg_url, **FLAGS) as first, \
            ThreadServer(tmp_path / "second", db=pg_url, **FLAGS) as second:
        tenant = first.admin.tenant(name="pg-tenant")
        prompt = [{"role": "system", "content": "You answer for the PostgreSQL test. " * 8},
                  {"role": "user", "content": "hello"}]
        seen = []
        for srv in (first, second, first):
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=tenant.key, max_retries=0)
            c = client.chat.completions.create(model="demo", messages=prompt, max_tokens=4)
            seen.append(c.usage)
        # each replica has its own cache: the first request on each writes, the repeat hits
        assert [u.prompt_tokens_details.cached_tokens > 0 for u in seen] == [False, False, True]
        for srv in (first, second):
            totals = srv.admin.usage(tenant.id)
            assert totals["requests"] == 3
            assert totals["prompt_tokens"] == sum(u.prompt_tokens for u in seen)
            assert totals["completion_tokens"] == sum(u.completion_tokens for u in seen)
            assert totals["cached_tokens"] == sum(u.prompt_tokens_details.cached_tokens
                                                  for u in seen)
            assert totals["cost_micros"] > 0 and isinstance(totals["cost_micros"], int)
